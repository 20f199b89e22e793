"""Typed, validated settings for consentgate, loaded from TOML.

The documented default file is ``config/consentgate.toml``; examples live in
``config/examples/``.
"""

from config.settings import (
    DEFAULT_CONFIG_NAME,
    ConfigError,
    NodeSettings,
    PeerSettings,
    Settings,
    load_settings,
    locate_config,
)

__all__ = [
    "DEFAULT_CONFIG_NAME",
    "ConfigError",
    "NodeSettings",
    "PeerSettings",
    "Settings",
    "load_settings",
    "locate_config",
]
