"""Modality Performed Procedure Step: the rules a modality's N-CREATE and N-SET are
checked against, the steps and the outbox they are kept in, and the forwarder that
sends them to the RIS in order.  Its modules use the top level (config, store, aio),
gateway/dicom/'s negotiation tables and patches, and the pipeline's backoff.  The
receiver processes serve its SCP; the pipeline does not import it.
"""
