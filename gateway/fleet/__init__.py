"""The fleet receiver (`dicom-gateway fleet serve`): the other end of the boxes'
heartbeats, for an operations team watching many clinics, most of them behind NAT.

It accepts heartbeats over mutual TLS, a box known by its client certificate, keeps
each box's last state in a SQLite file of its own (the ``boxes`` table, owned by
boxes.py), and shows them as a page and as Prometheus metrics labelled ``box``.

It runs on a monitoring host, not on a box: its modules use only the top level
(config, heartbeat_body, metrics' prefix), and nothing but the command line imports
them (tests/test_architecture.py holds both).
"""
