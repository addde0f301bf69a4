"""Task plugins: the registry, package.module:factory, the spear.tasks entry-point group, and
one clear line (exit 2, nothing on disk) for unknown or broken plugins."""

from __future__ import annotations

import itertools
import re
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from spear import cli
from spear.config import ConfigError, load_config
from spear.envs.arithmetic import ArithmeticTasks
from spear.envs.function_task import FunctionTask
from spear.tasks import (
    TASKS,
    PluginEnvFactory,
    TaskPluginError,
    build_task,
    env_factory,
    register_task,
    resolve_task,
)

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_IDS = itertools.count()

PLUGIN = '''
from spear.envs.function_task import FunctionTask


def double(x: int) -> int:
    """Twice x.

    Args:
        x: A number.
    """
    return 2 * x


ROWS = [{"prompt": f"Double {i}.", "answer": 2 * i} for i in range(40)]


def make(cfg):
    return FunctionTask(name="doubler", data=ROWS, tools=[double], held_out_fraction=0.3, config=cfg)


def make_without_config():
    return FunctionTask(name="doubler", data=ROWS, tools=[double], held_out_fraction=0.3)


INSTANCE = make_without_config()


def raises(cfg):
    raise RuntimeError("the dataset is missing\\nsecond line")


def returns_wrong(cfg):
    return 42


NOT_CALLABLE = 3
'''


@pytest.fixture
def plugin_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Path, str]]:
    """A directory holding a fresh plugin module (a new name each test), made the cwd."""
    name = f"spear_test_plugin_{next(_IDS)}"
    (tmp_path / f"{name}.py").write_text(PLUGIN)
    monkeypatch.chdir(tmp_path)
    before = list(sys.path)
    yield tmp_path, name
    sys.path[:] = before
    sys.modules.pop(name, None)


def test_registered_names_resolve_and_register_task_adds_one() -> None:
    assert {"arithmetic", "lookup", "math", "textworld"} <= set(TASKS.names())
    assert isinstance(build_task(load_config()), ArithmeticTasks)

    @register_task("spear-test-registered")
    def factory(cfg: object) -> ArithmeticTasks:
        return ArithmeticTasks.from_config(load_config())

    try:
        cfg = load_config(overrides=["task.name=spear-test-registered"])
        assert isinstance(build_task(cfg), ArithmeticTasks)
    finally:
        TASKS._entries.pop("spear-test-registered")
    with pytest.raises(ValueError, match="must not contain ':'"):
        register_task("a:b")


@pytest.mark.parametrize("attr", ["make", "make_without_config", "INSTANCE"])
def test_module_attribute_plugins(plugin_dir: tuple[Path, str], attr: str) -> None:
    _, module = plugin_dir
    cfg = load_config(overrides=[f"task.name={module}:{attr}", "rollout.tool_timeout_s=1.5"])
    source = build_task(cfg)
    assert isinstance(source, FunctionTask) and source.name == "doubler"
    if attr == "make":  # the factory got the run's config
        assert source.tool_timeout_s == 1.5


@pytest.mark.parametrize(
    ("spec", "expect"),
    [
        ("arithmetc", "unknown task 'arithmetc'; known: arithmetic, lookup, math, textworld. Did you mean 'arithmetic'?"),
        ("no_such_module_xyz:make", "no module 'no_such_module_xyz'"),
        ("{module}:missing", "module {module} has no attribute 'missing'"),
        ("{module}:NOT_CALLABLE", "int object is neither a task factory nor a TaskSource"),
        (":make", "a plugin is written package.module:attribute"),
    ],
)  # fmt: skip
def test_unknown_plugins_fail_at_config_load(
    plugin_dir: tuple[Path, str], spec: str, expect: str
) -> None:
    _, module = plugin_dir
    with pytest.raises(ConfigError) as exc:
        load_config(overrides=[f"task.name={spec.format(module=module)}"])
    msg = str(exc.value)
    assert msg.startswith("invalid config: task.name: ") and expect.format(module=module) in msg
    assert "\n" not in msg


def test_a_module_that_fails_to_import_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "spear_broken_plugin.py").write_text("import math\nraise ValueError('bad\\nx')\n")
    (tmp_path / "spear_syntax_plugin.py").write_text("def f(:\n")
    (tmp_path / "spear_dep_plugin.py").write_text("import a_dependency_that_is_missing\n")
    monkeypatch.chdir(tmp_path)
    for module, expect in [
        ("spear_broken_plugin", "importing spear_broken_plugin failed: ValueError: bad"),
        ("spear_syntax_plugin", "importing spear_syntax_plugin failed: SyntaxError"),
        ("spear_dep_plugin", "No module named 'a_dependency_that_is_missing'"),
    ]:
        with pytest.raises(TaskPluginError, match=re.escape(expect)) as exc:
            resolve_task(f"{module}:make")
        assert "\n" not in str(exc.value)
        sys.modules.pop(module, None)


@pytest.mark.parametrize(
    ("attr", "expect"),
    [
        ("raises", "the task factory raised RuntimeError: the dataset is missing"),
        ("returns_wrong", "the factory returned a int, not a TaskSource"),
    ],
)
def test_a_broken_factory_is_one_line_when_the_task_is_built(
    plugin_dir: tuple[Path, str], attr: str, expect: str
) -> None:
    _, module = plugin_dir
    cfg = load_config(overrides=[f"task.name={module}:{attr}"])  # resolves fine
    with pytest.raises(TaskPluginError) as exc:
        build_task(cfg)
    assert str(exc.value) == f"task.name={module}:{attr}: {expect}" + (
        ""
        if attr == "raises"
        else " (an object with name, tasks(split, n, seed), make_env() and tools())"
    )


def test_entry_point_plugins(plugin_dir: tuple[Path, str], monkeypatch: pytest.MonkeyPatch) -> None:
    root, module = plugin_dir
    dist = root / "spear_test_dist-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: spear-test-dist\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(
        textwrap.dedent(f"""\
        [spear.tasks]
        doubler = {module}:make
        broken = {module}_missing:make
        """)
    )
    monkeypatch.syspath_prepend(str(root))
    source = build_task(load_config(overrides=["task.name=doubler"]))
    assert isinstance(source, FunctionTask) and source.name == "doubler"
    with pytest.raises(
        ConfigError,
        match=r"loading the spear.tasks entry point .*_missing:make failed: ModuleNotFoundError",
    ):
        load_config(overrides=["task.name=broken"])
    with pytest.raises(ConfigError, match=r"known: arithmetic, broken, doubler, lookup, math"):
        load_config(overrides=["task.name=nothing"])


def test_cli_refuses_a_broken_plugin_with_exit_2_and_creates_nothing(
    plugin_dir: tuple[Path, str], capsys: pytest.CaptureFixture[str]
) -> None:
    root, module = plugin_dir
    for spec, expect in [
        ("no_such_module_xyz:make", "error: invalid config: task.name: 'no_such_module_xyz:make': no module"),
        (f"{module}:raises", f"error: task.name={module}:raises: the task factory raised RuntimeError"),
    ]:  # fmt: skip
        run_dir = root / "run"
        rc = cli.main(["train", f"task.name={spec}", f"trainer.run_dir={run_dir}"])
        out, err = capsys.readouterr()
        lines = [ln for ln in _ANSI.sub("", out + err).splitlines() if ln.strip()]
        assert rc == 2 and not run_dir.exists()
        assert lines[-1].startswith(expect) and "Traceback" not in out + err


def test_env_workers_rebuild_a_plugin_task_from_its_name(plugin_dir: tuple[Path, str]) -> None:
    import pickle

    root, module = plugin_dir
    cfg = load_config(overrides=[f"task.name={module}:make"])
    source = build_task(cfg)
    factory = env_factory(cfg, source, given=False)
    assert isinstance(factory, PluginEnvFactory) and str(root) in factory.search_path
    sys.modules.pop(module)  # as in a fresh worker process: the plugin is not imported yet
    sys.path.remove(str(root))
    clone = pickle.loads(pickle.dumps(factory))
    env = clone()
    messages, _ = env.reset(source.tasks("train", 1, 0)[0])
    assert messages[-1]["content"].startswith("Double ")
    assert module in sys.modules  # the worker imported the plugin itself
    builtin = load_config()
    assert env_factory(builtin, build_task(builtin), given=False).__self__.name == "arithmetic"  # type: ignore[attr-defined]
    assert env_factory(cfg, source, given=True) == source.make_env
