"""The DICOM side: what modalities associate with.  The receiver processes, the C-ECHO
and C-STORE handlers and the status each failure answers, what is negotiated (and the
Conformance Statement generated from it), and every change the gateway makes to
pynetdicom (patches.py installs them all, in one call).  Its modules use the top level
(config, spool, store, metrics, notify) and the MPPS and worklist SCPs a receiver
process serves (gateway/mpps/, gateway/worklist/); they do not import gateway/pipeline/
or gateway/web/: an instance is theirs until it is in the spool and its queue row is
committed, and the pipeline takes it from there.
"""
