"""Modality Performed Procedure Step: the SCP's rules a modality's N-CREATE and N-SET
are checked against (scp.py), the steps and the outbox they are kept in (outbox.py),
and the forwarder that sends them to the RIS in order (forwarder.py).  Its modules use
the top level (config, store, aio, backoff), gateway/dicom/'s status codes,
negotiation tables and patches, and gateway/worklist/cache.py (a step marks the
worklist items it refers to).  The receiver processes serve its SCP (scp.py, without
the forwarder); the pipeline does not import it.
"""
