"""What people and monitoring see: the aiohttp server (status page, JSON API, /metrics,
/livez, /readyz), the page itself, its credentials, the status document every reader
uses, and the optional heartbeat.  Its modules read the rest of the gateway; the only
thing they change is what an operator asks for (a retry of failed instances, a pause
or resume of uploads, through gateway/pipeline/jobs.py's Pipeline).
"""
