"""Consent-gated viewer (later issue)."""
