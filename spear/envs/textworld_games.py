"""TextWorld games generated offline from seeds: challenge specs, the on-disk cache, splits.

A game is fully determined by ``(challenge, settings, seed, TextWorld version)``: TextWorld's
generators are deterministic in the seed (checked: two processes produce byte-identical ``.z8``
files). Generated games are cached under ``<cache_dir>/textworld-<version>/<challenge>-<digest>/``
as ``seed<NNNNNNN>.z8`` (the compiled Z-machine story) plus ``seed<NNNNNNN>.json`` (TextWorld's
game description, which the ``TWInform7`` wrapper needs for scores, admissible commands and the
walkthrough). A game is published by two atomic renames (json first, z8 last), so concurrent
generators of the same seed never see a half-written game.

Splits are defined by seeds, not by committed files: held-out seeds are
``range(HELD_OUT_SEED_START, HELD_OUT_SEED_START + HELD_OUT_SIZE)``, validation seeds (for choosing
settings without touching the held-out games) the next ``VALIDATION_SIZE``, and training seeds
are ``range(0, num_train_games)`` with ``num_train_games <= HELD_OUT_SEED_START``, so the three
never overlap whatever the caller asks for.

TextWorld itself is an optional extra, imported lazily (:func:`require_textworld`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import multiprocessing
import os
import shutil
import signal
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from spear.registry import Registry

log = logging.getLogger(__name__)

INSTALL_HINT = "TextWorld is not installed: run pip install 'spear[textworld]'"

HELD_OUT_SEED_START = 1_000_000  # first held-out seed; training seeds are all below it
HELD_OUT_SIZE = 1_000  # held-out seeds: HELD_OUT_SEED_START .. HELD_OUT_SEED_START + 999
VALIDATION_SEED_START = HELD_OUT_SEED_START + HELD_OUT_SIZE  # validation seeds follow them
VALIDATION_SIZE = 1_000


class TextWorldMissingError(ImportError, RuntimeError):
    """The optional ``textworld`` dependency is not installed.

    Also a ``RuntimeError``: the command line reports runtime errors as one ``error:`` line
    (without a traceback), which is all a user needs here.
    """


def require_textworld() -> ModuleType:
    """Import and return ``textworld``, or raise one clear line naming the extra to install."""
    try:
        import textworld
        import textworld.challenges
        import textworld.generator
    except ImportError as e:
        raise TextWorldMissingError(INSTALL_HINT) from e
    return textworld


# --------------------------------------------------------------------------------------------
# Challenges and their difficulty knobs
# --------------------------------------------------------------------------------------------

#: challenge name -> (level -> complete TextWorld settings of that challenge)
LEVEL_SETTINGS: Registry[Callable[[int], dict[str, Any]]] = Registry("textworld challenge")


def _check_level(challenge: str, level: int, low: int, high: int) -> None:
    if not isinstance(level, int) or isinstance(level, bool) or not low <= level <= high:
        raise ValueError(f"level of {challenge} must be an int in [{low}, {high}], got {level!r}")


@LEVEL_SETTINGS.register("tw-coin_collector")
def _coin_collector(level: int) -> dict[str, Any]:
    """Levels 1-100: a chain of ``level`` rooms; 101-300 add distractor rooms (TextWorld's)."""
    _check_level("tw-coin_collector", level, 1, 300)
    return {"level": level}


@LEVEL_SETTINGS.register("tw-treasure_hunter")
def _treasure_hunter(level: int) -> dict[str, Any]:
    """Levels 1-10 easy, 11-20 doors/containers, 21-30 locked ones (TextWorld's)."""
    _check_level("tw-treasure_hunter", level, 1, 30)
    return {"level": level}


_COOKING_LEVELS: dict[int, dict[str, Any]] = {
    1: {"recipe": 1, "take": 1, "go": 1, "open": True, "cook": False, "cut": False, "drop": False},
    2: {"recipe": 1, "take": 1, "go": 1, "open": True, "cook": False, "cut": True, "drop": False},
    3: {"recipe": 1, "take": 1, "go": 6, "open": True, "cook": True, "cut": True, "drop": False},
    4: {"recipe": 2, "take": 2, "go": 6, "open": True, "cook": True, "cut": True, "drop": False},
    5: {"recipe": 3, "take": 3, "go": 9, "open": True, "cook": True, "cut": True, "drop": True},
}


@LEVEL_SETTINGS.register("tw-cooking")
def _cooking(level: int) -> dict[str, Any]:
    """Our ladder over TextWorld's cooking knobs (ingredients, rooms, open/cut/cook/drop)."""
    _check_level("tw-cooking", level, 1, len(_COOKING_LEVELS))
    return {**_COOKING_LEVELS[level], "recipe_seed": 0, "split": None}


@LEVEL_SETTINGS.register("tw-simple")
def _simple(level: int) -> dict[str, Any]:
    """Level 1/2/3 = dense/balanced/sparse intermediate rewards, detailed goal."""
    _check_level("tw-simple", level, 1, 3)
    return {
        "rewards": ("dense", "balanced", "sparse")[level - 1],
        "goal": "detailed",
        "test": False,
    }


@dataclass(frozen=True, slots=True)
class GameSpec:
    """A challenge and its complete TextWorld settings (sorted ``(knob, value)`` pairs)."""

    challenge: str
    settings: tuple[tuple[str, Any], ...]

    def settings_dict(self) -> dict[str, Any]:
        return dict(self.settings)

    def digest(self) -> str:
        """A short stable hash of challenge + settings (the cache folder name)."""
        blob = json.dumps([self.challenge, list(self.settings)], sort_keys=True)
        return hashlib.sha1(blob.encode()).hexdigest()[:10]


def game_spec(challenge: str, level: int, overrides: Mapping[str, Any] | None = None) -> GameSpec:
    """The spec of ``challenge`` at ``level``; ``overrides`` replace individual knobs.

    Unknown challenges raise :class:`~spear.registry.UnknownNameError`; an override of a knob the
    challenge does not have raises ``ValueError`` naming it.
    """
    settings = LEVEL_SETTINGS.get(challenge)(level)
    for key, value in (overrides or {}).items():
        if key not in settings:
            known = ", ".join(sorted(settings))
            raise ValueError(f"{challenge} has no setting {key!r}; its settings are: {known}")
        settings[key] = value
    return GameSpec(challenge=challenge, settings=tuple(sorted(settings.items())))


# --------------------------------------------------------------------------------------------
# Splits
# --------------------------------------------------------------------------------------------


def split_seeds(split: str, n: int, seed: int, num_train_games: int) -> list[int]:
    """``n`` game seeds of ``split``: "train" samples the training pool, "test" is held out,
    "validation" is a second set of unseen games for choosing settings.

    train: ``n`` seeds drawn (without replacement while ``n <= num_train_games``, then with) from
    ``range(num_train_games)``, deterministic in ``seed``. test / validation: the first ``n``
    seeds of that set (independent of ``seed``, so every evaluation sees the same games).
    """
    import random

    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if split == "test":
        if n > HELD_OUT_SIZE:
            raise ValueError(f"n={n} exceeds the {HELD_OUT_SIZE} held-out TextWorld games")
        return list(range(HELD_OUT_SEED_START, HELD_OUT_SEED_START + n))
    if split == "validation":
        if n > VALIDATION_SIZE:
            raise ValueError(f"n={n} exceeds the {VALIDATION_SIZE} validation TextWorld games")
        return list(range(VALIDATION_SEED_START, VALIDATION_SEED_START + n))
    if split != "train":
        raise ValueError(f"split must be 'train', 'validation' or 'test', got {split!r}")
    if not 1 <= num_train_games <= HELD_OUT_SEED_START:
        raise ValueError(
            f"num_train_games must be in [1, {HELD_OUT_SEED_START}] (held-out seeds start "
            f"there), got {num_train_games}"
        )
    rng = random.Random(seed)
    if n <= num_train_games:
        return rng.sample(range(num_train_games), n)
    return [rng.randrange(num_train_games) for _ in range(n)]


# --------------------------------------------------------------------------------------------
# Generation and cache
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class GenerationResult:
    """What became of one seed: the cached game file, or why it could not be generated."""

    seed: int
    path: str | None  # the .z8 file; None when generation failed
    seconds: float  # wall time spent generating (0 for a cache hit)
    cached: bool  # True when the game was already on disk
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.path is not None


def generate_game(
    challenge: str, settings: Mapping[str, Any], seed: int, path: str
) -> GenerationResult:
    """Generate and compile one game into ``path`` (a ``.z8`` file); never raises.

    Runs in a worker process. The game is built in a private temporary folder next to ``path``
    and published by atomic renames.
    """
    start = time.perf_counter()
    final = Path(path)
    tmp = final.parent / f".tmp-{final.stem}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        textworld = require_textworld()
        from textworld.generator import compile_game

        options = textworld.GameOptions()
        options.seeds = seed
        options.path = str(tmp / final.name)
        options.force_recompile = True
        make = textworld.challenges.CHALLENGES[challenge][1]
        game = make(settings=dict(settings), options=options)
        compiled = Path(compile_game(game, options))
        os.replace(compiled.with_suffix(".json"), final.with_suffix(".json"))
        os.replace(compiled, final)
    except Exception as e:  # a failed game is reported, counted and skipped, never fatal
        return GenerationResult(
            seed, None, time.perf_counter() - start, False, f"{type(e).__name__}: {e}"
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return GenerationResult(seed, str(final), time.perf_counter() - start, False)


class GameCache:
    """The cached games of one :class:`GameSpec` under ``cache_dir``."""

    def __init__(self, cache_dir: str | Path, spec: GameSpec) -> None:
        textworld = require_textworld()
        self.spec = spec
        self.folder = (
            Path(cache_dir).expanduser()
            / f"textworld-{textworld.__version__}"
            / f"{spec.challenge}-{spec.digest()}"
        )

    def path(self, seed: int) -> Path:
        if seed < 0:
            raise ValueError(f"game seed must be >= 0, got {seed}")
        return self.folder / f"seed{seed:07d}.z8"

    def is_cached(self, seed: int) -> bool:
        p = self.path(seed)
        return p.is_file() and p.with_suffix(".json").is_file()

    def ensure(
        self, seeds: Iterable[int], *, workers: int, progress: bool
    ) -> dict[int, GenerationResult]:
        """Generate every missing game of ``seeds`` (``workers`` processes); results by seed."""
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.folder.mkdir(parents=True, exist_ok=True)
        unique = list(dict.fromkeys(seeds))
        results = {
            s: GenerationResult(s, str(self.path(s)), 0.0, True)
            for s in unique
            if self.is_cached(s)
        }
        missing = [s for s in unique if s not in results]
        if missing:
            results.update(self._generate(missing, workers, progress))
            failed = sum(1 for s in missing if not results[s].ok)
            if failed:
                log.warning("%d of %d TextWorld games failed to generate", failed, len(missing))
        return results

    def _generate(
        self, seeds: Sequence[int], workers: int, progress: bool
    ) -> dict[int, GenerationResult]:
        settings = self.spec.settings_dict()
        n = len(seeds)
        label = f"generating {n} {self.spec.challenge} game{'' if n == 1 else 's'}"
        out: dict[int, GenerationResult] = {}
        with _progress(label, len(seeds), progress) as advance:
            if workers == 1 or len(seeds) == 1:
                for s in seeds:
                    out[s] = generate_game(self.spec.challenge, settings, s, str(self.path(s)))
                    advance()
                return out
            ctx = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(max_workers=min(workers, len(seeds)), mp_context=ctx) as pool:
                futures: dict[Future[GenerationResult], int] = {
                    pool.submit(
                        generate_game, self.spec.challenge, settings, s, str(self.path(s))
                    ): s
                    for s in seeds
                }
                for fut in as_completed(list(futures)):
                    s = futures[fut]
                    try:
                        out[s] = fut.result()
                    except Exception as e:  # the worker process itself died
                        out[s] = GenerationResult(s, None, 0.0, False, f"{type(e).__name__}: {e}")
                    advance()
        return out


@contextlib.contextmanager
def _progress(label: str, total: int, enabled: bool) -> Iterator[Callable[[], None]]:
    """A rich progress bar (or nothing) exposing an ``advance()`` callable."""
    if not enabled:
        yield lambda: None
        return
    from rich.progress import Progress

    with Progress() as bar:
        task = bar.add_task(label, total=total)
        yield lambda: bar.advance(task)


# --------------------------------------------------------------------------------------------
# Process-parallel batch stepping
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PoolParams:
    """Shape and limits of a :class:`ProcessEnvPool`."""

    num_workers: int  # worker processes
    envs_per_worker: int  # K envs (games) hosted and stepped in turn by each worker
    timeout_s: float  # per reset/step call; a worker that has not answered by then is killed
    startup_timeout_s: float  # for a (re)started worker to import and report ready
    start_method: str  # multiprocessing start method: "spawn" (safe) or "forkserver"/"fork"

    def __post_init__(self) -> None:
        if self.num_workers < 1 or self.envs_per_worker < 1:
            raise ValueError(f"num_workers and envs_per_worker must be >= 1, got {self}")
        if self.timeout_s <= 0 or self.startup_timeout_s <= 0:
            raise ValueError(f"timeout_s and startup_timeout_s must be > 0, got {self}")
        if self.start_method not in multiprocessing.get_all_start_methods():
            raise ValueError(f"start_method {self.start_method!r} is not available here")


@dataclass(slots=True)
class PoolStats:
    """Failure counters of a pool (each failed episode is counted once, under its cause)."""

    crashes: int = 0  # episodes lost because their worker process died
    timeouts: int = 0  # episodes lost because their worker exceeded the call timeout
    env_errors: int = 0  # episodes whose env raised (e.g. a game that failed to generate)
    restarts: int = 0  # worker processes restarted


@dataclass(frozen=True, slots=True)
class PoolReset:
    """The outcome of resetting one slot: first messages and info, or the error that failed it."""

    messages: list[Any]
    info: dict[str, Any]
    error: str | None = None


def _worker_main(conn: Any, env_factory: Callable[[], Any], k: int) -> None:
    """Worker loop: host ``k`` envs; answer ``(cmd, [(slot, arg), ...])`` with per-slot results."""
    # Ctrl-C in the terminal reaches the whole process group: it is the trainer's to handle (it
    # finishes the step in flight, which needs these workers); the trainer closes them.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    envs: list[Any] = [None] * k
    conn.send(("ready", os.getpid()))
    while True:
        try:
            cmd, items = conn.recv()
        except (EOFError, OSError):
            break
        if cmd == "close":
            break
        out: list[tuple[int, str | None, Any]] = []
        for local, arg in items:
            try:
                if envs[local] is None:
                    envs[local] = env_factory()
                env = envs[local]
                res = env.reset(arg[0], seed=arg[1]) if cmd == "reset" else env.step(arg)
                out.append((local, None, res))
            except Exception as e:  # reported per slot; the worker keeps serving the others
                out.append((local, f"{type(e).__name__}: {e}", None))
        conn.send(out)
    for env in envs:
        if env is not None:
            env.close()


class ProcessEnvPool:
    """``num_workers x envs_per_worker`` env slots stepped concurrently in worker processes.

    ``reset(tasks)`` starts an episode in slot ``i`` for every non-None ``tasks[i]``;
    ``step(actions)`` applies ``actions[i]`` to every slot with a non-None action and returns
    its :class:`~spear.envs.base.StepResult` (None elsewhere). A failure never raises: an env
    error, a worker crash or a call timeout ends the affected episodes as failed
    (``terminated=True``, ``info["env_error"]``, ``info["success"] = False``), counts them in
    :attr:`stats`, and a dead or hung worker is restarted (every running episode it hosted is
    lost and reported failed at its next step). ``env_factory`` must be picklable with the
    "spawn" start method (a top-level class or a ``functools.partial`` of one).
    """

    def __init__(self, env_factory: Callable[[], Any], params: PoolParams) -> None:
        self.params = params
        self.stats = PoolStats()
        self._factory = env_factory
        self._ctx: Any = multiprocessing.get_context(params.start_method)
        self._running = [False] * self.capacity
        self._lost: dict[int, str] = {}  # slot -> why its running episode was lost
        self._workers = [self._spawn() for _ in range(params.num_workers)]

    @property
    def capacity(self) -> int:
        return self.params.num_workers * self.params.envs_per_worker

    def reset(
        self, tasks: Sequence[Any], seeds: Sequence[int | None] | None = None
    ) -> list[PoolReset | None]:
        self._check_len(tasks, "tasks")
        seeds = seeds if seeds is not None else [None] * len(tasks)
        self._check_len(seeds, "seeds")
        wanted = {i: (t, seeds[i]) for i, t in enumerate(tasks) if t is not None}
        out: list[PoolReset | None] = [None] * self.capacity
        for slot, (err, res) in self._call("reset", wanted).items():
            self._lost.pop(slot, None)
            self._running[slot] = err is None
            out[slot] = (
                PoolReset(list(res[0]), dict(res[1]))
                if err is None
                else PoolReset([], {"success": False}, err)
            )
        return out

    def step(self, actions: Sequence[str | None]) -> list[Any]:
        from spear.envs.base import StepResult

        self._check_len(actions, "actions")
        out: list[Any] = [None] * self.capacity
        wanted: dict[int, str] = {}
        for i, a in enumerate(actions):
            if a is None:
                continue
            if i in self._lost:
                out[i] = _failed_step(self._lost.pop(i))
            elif not self._running[i]:
                raise ValueError(f"slot {i} has no running episode; reset it before stepping")
            else:
                wanted[i] = a
        for slot, (err, res) in self._call("step", wanted).items():
            if err is not None:
                out[slot], self._running[slot] = _failed_step(err), False
                continue
            assert isinstance(res, StepResult)
            out[slot] = res
            self._running[slot] = not (res.terminated or res.truncated)
        return out

    def close(self) -> None:
        for w in self._workers:
            with contextlib.suppress(OSError, ValueError):
                w.conn.send(("close", []))
        for w in self._workers:
            w.stop(graceful=True)
        self._workers = []

    def __enter__(self) -> ProcessEnvPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals ---------------------------------------------------------------------------

    def _check_len(self, items: Sequence[Any], name: str) -> None:
        if len(items) > self.capacity:
            raise ValueError(
                f"{name} has {len(items)} entries but the pool has {self.capacity} slots"
            )

    def _spawn(self) -> _Worker:
        parent, child = self._ctx.Pipe()
        proc = self._ctx.Process(
            target=_worker_main,
            args=(child, self._factory, self.params.envs_per_worker),
            daemon=True,
        )
        proc.start()
        child.close()
        return _Worker(proc, parent)

    def _call(self, cmd: str, wanted: Mapping[int, Any]) -> dict[int, tuple[str | None, Any]]:
        """Send each worker its slots' work, gather answers until the deadline, handle failures."""
        import time as _time

        k = self.params.envs_per_worker
        by_worker: dict[int, list[tuple[int, Any]]] = {}
        for slot, arg in wanted.items():
            by_worker.setdefault(slot // k, []).append((slot % k, arg))
        results: dict[int, tuple[str | None, Any]] = {}
        sent: list[int] = []
        for w, items in by_worker.items():
            if not self._workers[w].wait_ready(self.params.startup_timeout_s):
                msg = f"worker did not start within {self.params.startup_timeout_s:g}s"
                self._fail_worker(w, items, results, msg, timeout=False)
                continue
            try:
                self._workers[w].conn.send((cmd, items))
                sent.append(w)
            except (OSError, ValueError):
                self._fail_worker(w, items, results, "worker process died", timeout=False)
        deadline = _time.monotonic() + self.params.timeout_s
        for w in sent:
            conn = self._workers[w].conn
            try:
                if not conn.poll(max(0.0, deadline - _time.monotonic())):
                    msg = f"worker exceeded the {self.params.timeout_s:g}s call timeout"
                    self._fail_worker(w, by_worker[w], results, msg, timeout=True)
                    continue
                answers = conn.recv()
            except (EOFError, OSError):
                self._fail_worker(w, by_worker[w], results, "worker process died", timeout=False)
                continue
            for local, err, res in answers:
                results[w * k + local] = (err, res)
                self.stats.env_errors += err is not None
        return results

    def _fail_worker(
        self,
        w: int,
        items: list[tuple[int, Any]],
        results: dict[int, tuple[str | None, Any]],
        msg: str,
        *,
        timeout: bool,
    ) -> None:
        """Restart worker ``w``; fail its requested slots now and its other running ones later."""
        k = self.params.envs_per_worker
        requested = {w * k + local for local, _ in items}
        for slot in range(w * k, (w + 1) * k):
            if slot in requested:
                results[slot] = (msg, None)
            elif self._running[slot]:
                self._lost[slot] = msg
            else:
                continue
            self._running[slot] = False
            if timeout:
                self.stats.timeouts += 1
            else:
                self.stats.crashes += 1
        log.warning("restarting TextWorld env worker %d: %s", w, msg)
        self._workers[w].stop(graceful=False)
        self._workers[w] = self._spawn()
        self.stats.restarts += 1


@dataclass(slots=True)
class _Worker:
    proc: Any
    conn: Any
    ready: bool = False

    def wait_ready(self, timeout_s: float) -> bool:
        """Wait for the worker's start-up message (its imports are not charged to a call)."""
        if not self.ready:
            try:
                self.ready = bool(self.conn.poll(timeout_s)) and self.conn.recv()[0] == "ready"
            except (EOFError, OSError):
                self.ready = False
        return self.ready

    def stop(self, *, graceful: bool) -> None:
        """Join the process (after a close request when ``graceful``), killing it if needed."""
        self.proc.join(timeout=2.0 if graceful else 0.0)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(timeout=5.0)
        self.conn.close()


def _failed_step(error: str) -> Any:
    """The StepResult of an episode ended by an env error, crash or timeout."""
    from spear.envs.base import StepResult

    return StepResult(
        messages=[],
        reward=0.0,
        terminated=True,
        truncated=False,
        info={"env_error": error, "success": False},
    )
