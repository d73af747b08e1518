"""Modality Worklist: the MWL SCP the modalities query, answered from a local cache that
the sources (the RIS's MWL SCP, a UPS-RS worklist, a drop folder) fill.  Its modules
use the top level (config, store, auth), gateway/dicom/'s negotiation tables and C-FIND
encoding, and gateway/pipeline/upload.py's TLS context for UPS-RS.  The receiver
processes serve its SCP; the pipeline does not import it.
"""
