"""From the queue to the archive: start-up reconciliation of the spool against the queue,
the stages that claim queue rows, compress them (J2K lossless, in encoder processes)
and upload them (STOW-RS over mutual TLS), what each archive's answers mean, and the
archive's confirmation by search (confirm.py, ``commitment.verify = "qido"``).  Its
modules use only the top level (config, spool, store, auth, metrics, aio) and the
Storage Commitment table's held instances (retention keeps their files), and
gateway/dicom/ does not import them.  Others borrow from here: upload.py's TLS context
and error hints (the worklist's UPS-RS source, the heartbeat, the field tools),
jobs.py's backoff (the MPPS forwarder, the Storage Commitment reporter) and its retry
of failed rows (the web API, the command line).
"""
