"""Config fields that name a registry entry, checked when a config is validated.

Each entry of :data:`REGISTRY_FIELDS` maps a config field (``section.key``) to the registry its
value must name. The registries are imported when a config is validated, not when
``spear.config`` is imported (they pull in torch), so entries that user code registers before
loading a config are known too. ``None`` means "not set" (``replay.policy_loss``,
``rollout.parser``) and is not looked up. ``task.name`` is not listed: tasks may also come from
plugins, and the task registry is checked when the task is built.
"""

from __future__ import annotations

import importlib
from typing import Any

from spear.registry import Registry, UnknownNameError

# field -> (module, registry attribute)
REGISTRY_FIELDS: dict[str, tuple[str, str]] = {
    "advantage.estimator": ("spear.algo.advantages", "ADVANTAGES"),
    "loss.policy_loss": ("spear.algo.losses", "POLICY_LOSSES"),
    "loss.aggregation": ("spear.algo.aggregation", "AGGREGATIONS"),
    "loss.kl_type": ("spear.algo.kl", "KL_ESTIMATORS"),
    "replay.policy_loss": ("spear.algo.losses", "POLICY_LOSSES"),
    "rollout.parser": ("spear.rollout.parsers", "PARSERS"),
    "task.challenge": ("spear.envs.textworld_games", "LEVEL_SETTINGS"),
}


def registry_of(field: str) -> Registry[Any]:
    """The registry that config field ``field`` (``section.key``) names an entry of."""
    module, attr = REGISTRY_FIELDS[field]
    registry: Registry[Any] = getattr(importlib.import_module(module), attr)
    return registry


def unknown_name(cfg: Any) -> str | None:
    """The first field of ``cfg`` (a :class:`~spear.config.Config`) whose value no registry
    entry has, as one line ``"section.key: unknown <kind> 'x'; known: ..."``; None if all are
    known."""
    for field in REGISTRY_FIELDS:
        section, key = field.split(".")
        name = getattr(getattr(cfg, section), key)
        if name is None:
            continue
        registry = registry_of(field)
        if name not in registry:
            return f"{field}: {UnknownNameError(registry.kind, name, registry.names())}"
    return None
