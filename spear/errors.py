"""Exceptions shared by modules that must not import each other (``spear.config`` re-exports
:class:`ConfigError`)."""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration problem, phrased as what to change."""
