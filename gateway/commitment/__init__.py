"""Storage Commitment Push Model: "the cloud archive has it", said to the modality.

The SCP (scp.py) answers a modality's N-ACTION once the request is durable in the
tables of requests.py; decide.py decides each instance from the queue (committed only
once the archive confirmed the copy the gateway holds); the reporter (reporter.py)
sends the N-EVENT-REPORT on an association of its own to the requester's
``[[dimse.remote]]`` entry, and retries it while the modality is unreachable.  Its
modules use the top level (config, store, instances, clock, aio), gateway/dicom/'s
negotiation tables and status codes, and the pipeline's backoff.  The receiver
processes serve its SCP; the reporter runs in the gateway's main process.
"""
