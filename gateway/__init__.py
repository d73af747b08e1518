"""DICOM edge gateway: durable DIMSE ingest, J2K lossless, mTLS STOW-RS upload."""

__version__ = "0.1.0"
