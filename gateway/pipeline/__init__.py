"""From the queue to the archive: start-up reconciliation of the spool against the queue,
the stages that claim queue rows, compress them (J2K lossless, in encoder processes)
and upload them (STOW-RS over mutual TLS), what each archive's answers mean, and the
archive's confirmation by search (confirm.py, ``commitment.verify = "qido"``).  Its
modules use only the top level (config, spool, store, auth, https, backoff, metrics,
aio) and the Storage Commitment table's held instances (retention keeps their files),
and gateway/dicom/ does not import them.  The web server and the status hold the
running Pipeline of jobs.py (pause, resume, a wake-up after a retry; its state), and
the config takes archives.py's profile names and bandwidth.py's window syntax to
check what it loads.
"""
