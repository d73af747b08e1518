"""From the queue to the archive: start-up reconciliation of the spool against the queue,
the stages that claim queue rows, compress them (J2K lossless, in encoder processes)
and upload them (STOW-RS over mutual TLS), and what each archive's answers mean.  Its
modules use only the top level (config, spool, store, auth, https, metrics, aio), and
gateway/dicom/ does not import them.  Others borrow from here: jobs.py's backoff (the
MPPS forwarder) and its retry of failed rows (the web API, the command line).
"""
