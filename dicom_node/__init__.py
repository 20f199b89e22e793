"""The DICOM application entity: archive, SCP handlers and SCU side of consentgate."""
