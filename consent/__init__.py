"""Consent store, decision function and consent web module (issue #3 onwards)."""
