"""Which task a run trains on: the task registry and plugins.

``task.name`` is resolved, in this order, to a *task factory* (``(cfg) -> TaskSource`` or
``() -> TaskSource``) or directly to a :class:`~spear.envs.base.TaskSource` object:

1. a name registered with :func:`register_task` (the built-in ``arithmetic``, ``math`` and
   ``textworld``, and whatever an imported module registered);
2. ``package.module:attribute``: the attribute is imported (the current directory is searched
   first, as ``python -m`` does, so a module next to the config works);
3. a name in the ``spear.tasks`` entry-point group of an installed package
   (``[project.entry-points."spear.tasks"] mytask = "mypkg.tasks:make_task"``).

Resolving happens when the config loads (an unknown or broken plugin is one
:class:`TaskPluginError` line naming ``task.name``); building the source happens when the run's
components are built (:func:`build_task`), where a factory that raises or returns something that
is not a task source is one such line too. ``Trainer(cfg, run_dir, task=source)`` skips both.

For ``trainer.backend=ray`` :func:`env_factory` gives the env workers a picklable factory that
re-imports the plugin in the worker (with the directories it was found in on ``sys.path``) and
builds its envs there, so a plugin task runs unchanged on Ray.
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from spear.envs.base import Env, TaskSource
from spear.errors import ConfigError
from spear.registry import Registry, UnknownNameError

if TYPE_CHECKING:
    from spear.config import Config

ENTRY_POINT_GROUP = "spear.tasks"

TaskFactory = Callable[["Config"], TaskSource]
#: name -> factory of the registered tasks (built-ins and ``register_task`` calls)
TASKS: Registry[TaskFactory] = Registry("task")


class TaskPluginError(ConfigError):
    """``task.name`` cannot be resolved or its factory failed; the message is one line."""


def register_task(name: str) -> Callable[[TaskFactory], TaskFactory]:
    """Decorator registering a ``(cfg) -> TaskSource`` factory as ``task.name=<name>``."""
    if ":" in name:
        raise ValueError(f"task name {name!r} must not contain ':' (that marks module:attribute)")
    return TASKS.register(name)


@register_task("arithmetic")
def _arithmetic(cfg: Config) -> TaskSource:
    from spear.envs.arithmetic import ArithmeticTasks

    return ArithmeticTasks.from_config(cfg)


@register_task("lookup")
def _lookup(cfg: Config) -> TaskSource:
    from spear.envs.lookup import LookupTasks

    return LookupTasks.from_config(cfg)


@register_task("math")
def _math(cfg: Config) -> TaskSource:
    from spear.envs.math_task import MathTasks

    return MathTasks.from_config(cfg)


@register_task("textworld")
def _textworld(cfg: Config) -> TaskSource:
    from spear.envs.textworld_env import TextWorldTasks

    return TextWorldTasks.from_config(cfg)


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def _import_attribute(spec: str) -> Any:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise TaskPluginError(
            f"task.name={spec}: a plugin is written package.module:attribute (both parts)"
        )
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name is not None and module_name.startswith(e.name):
            raise TaskPluginError(
                f"task.name={spec}: no module {e.name!r} (searched the current directory and "
                "the installed packages)"
            ) from None
        raise TaskPluginError(
            f"task.name={spec}: importing {module_name} failed: {_one_line(e)}"
        ) from None
    except Exception as e:  # a broken plugin: SyntaxError, an error at import time, ...
        raise TaskPluginError(
            f"task.name={spec}: importing {module_name} failed: {_one_line(e)}"
        ) from None
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise TaskPluginError(
                f"task.name={spec}: module {module_name} has no attribute {attr!r}"
            )
        obj = getattr(obj, part)
    return obj


def _entry_point(name: str) -> Any | None:
    found = [ep for ep in metadata.entry_points(group=ENTRY_POINT_GROUP) if ep.name == name]
    if not found:
        return None
    try:
        return found[0].load()
    except Exception as e:
        raise TaskPluginError(
            f"task.name={name}: loading the {ENTRY_POINT_GROUP} entry point {found[0].value} "
            f"failed: {_one_line(e)}"
        ) from None


def entry_point_names() -> list[str]:
    """Names offered by installed packages in the ``spear.tasks`` entry-point group."""
    return sorted({ep.name for ep in metadata.entry_points(group=ENTRY_POINT_GROUP)})


def resolve_task(name: str) -> Any:
    """The factory (or task source) ``task.name`` names; see the module docstring for the order.

    Raises :class:`TaskPluginError` (one line) for an unknown name or a plugin that cannot be
    imported."""
    if name in TASKS:
        return TASKS.get(name)
    if ":" in name:
        target = _import_attribute(name)
    else:
        target = _entry_point(name)
        if target is None:
            known = [*TASKS.names(), *entry_point_names()]
            msg = UnknownNameError("task", name, known).message
            raise TaskPluginError(
                f"task.name={name}: {msg} A plugin is package.module:factory or a "
                f"{ENTRY_POINT_GROUP} entry point."
            )
    if not (callable(target) or isinstance(target, TaskSource)):
        raise TaskPluginError(
            f"task.name={name}: {type(target).__name__} object is neither a task factory nor a "
            "TaskSource"
        )
    return target


def _takes_config(fn: Callable[..., Any]) -> bool:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # builtins without a signature: assume the documented form
        return True
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return bool(positional) or any(p.kind is p.VAR_POSITIONAL for p in params)


def build_task(cfg: Config) -> TaskSource:
    """The task source of ``cfg.task.name`` (a factory is called with ``cfg`` when it takes an
    argument). Anything going wrong is one :class:`TaskPluginError` line."""
    name = cfg.task.name
    target = resolve_task(name)
    if isinstance(target, TaskSource) and not isinstance(target, type):
        return target
    if name in TASKS:  # built-ins raise their own, already clear, errors
        return target(cfg)  # type: ignore[no-any-return]
    try:
        source = target(cfg) if _takes_config(target) else target()
    except Exception as e:
        raise TaskPluginError(f"task.name={name}: the task factory raised {_one_line(e)}") from None
    if not isinstance(source, TaskSource):
        raise TaskPluginError(
            f"task.name={name}: the factory returned a {type(source).__name__}, not a TaskSource "
            "(an object with name, tasks(split, n, seed), make_env() and tools())"
        )
    return source


def _module_roots(name: str) -> tuple[str, ...]:
    """Directories a worker must have on ``sys.path`` to import the plugin ``name``."""
    roots = [os.getcwd()]
    module_name = name.partition(":")[0]
    module = sys.modules.get(module_name)
    file = getattr(module, "__file__", None)
    if file:
        root = Path(file).resolve().parent
        for _ in range(module_name.count(".") + (Path(file).stem == "__init__")):
            root = root.parent
        roots.insert(0, str(root))
    return tuple(dict.fromkeys(roots))


@dataclass
class PluginEnvFactory:
    """A picklable ``make_env`` that builds the task source in the process calling it.

    Sent to Ray env workers: the first call there puts ``search_path`` on ``sys.path``, resolves
    ``cfg.task.name`` (importing the plugin) and builds the source; every call returns one of
    its envs.
    """

    cfg: Config
    search_path: tuple[str, ...]
    _source: TaskSource | None = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __getstate__(self) -> dict[str, Any]:
        return {"cfg": self.cfg, "search_path": self.search_path}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.cfg, self.search_path = state["cfg"], state["search_path"]
        self._source, self._lock = None, threading.Lock()

    def __call__(self) -> Env:
        with self._lock:
            if self._source is None:
                for path in reversed(self.search_path):
                    if path not in sys.path:
                        sys.path.insert(0, path)
                self._source = build_task(self.cfg)
        return self._source.make_env()


def env_factory(cfg: Config, source: TaskSource, *, given: bool) -> Callable[[], Env]:
    """The ``make_env`` env workers get: the source's own for built-in tasks and for a source
    passed in Python (``given``; pickled as is), else a :class:`PluginEnvFactory`."""
    if given or cfg.task.name in TASKS:
        return source.make_env
    return PluginEnvFactory(cfg, _module_roots(cfg.task.name))
