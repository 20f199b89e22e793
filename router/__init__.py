"""Consent-enforcing router: routes, durable forward queue, forwarders (issue #3)."""
