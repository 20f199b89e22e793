"""The ``consentgate`` command and the composition root that wires settings to services."""
