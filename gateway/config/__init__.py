"""Configuration: typed schema, loader (defaults → shipped policies → site file) and secrets."""

from gateway.config.loader import load_config, resolve_secret, shipped_dir
from gateway.config.schema import Config

__all__ = ["Config", "load_config", "resolve_secret", "shipped_dir"]
