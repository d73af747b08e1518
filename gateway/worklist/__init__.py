"""Modality Worklist: the MWL SCP the modalities query, answered from a local cache that
the sources (the RIS's MWL SCP, a UPS-RS worklist, a drop folder) fill.  Its modules
use the top level (config, store, auth, https), gateway/dicom/'s negotiation tables,
status codes and C-FIND encoding.  The receiver processes serve its SCP; the pipeline
does not import it.
"""
