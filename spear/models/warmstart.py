"""Supervised warm start of the built-in tiny model on deliberately imperfect demonstrations.

Where demonstrations come from depends on the task (``task.name``): :data:`DEMO_SOURCES` maps a
task name to its :class:`DemoSource` (the ``textworld`` one, TextWorld's walkthroughs of training
games mixed with random admissible actions, lives in :mod:`spear.models.textworld_demos`).

The arithmetic demonstrations (scripted episodes of three kinds in exact proportions) live in
:mod:`spear.models.arithmetic_demos`.

The model sees its own (assistant) tokens in the loss only; the mask comes from the
prefix-stable chat rendering. The result is cached on disk, keyed by a hash of all parameters and
the seed, and written atomically (built in a temporary directory, then renamed).

The package ships the warm model of the default run (``spear/data/warm/warm-<key>/``, built by
``python -m spear.models.shipped``): :func:`ensure_warm_model` takes a shipped model of the
requested key before the cache, so every machine starts from the same weights and a first run
skips the build; any other key builds and caches as before.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from filelock import FileLock, Timeout
from torch import Tensor
from transformers import PreTrainedTokenizerFast

from spear.envs.arithmetic import ArithmeticTasks
from spear.envs.base import TaskSource
from spear.interrupts import Interrupted
from spear.models.arithmetic_demos import make_demos
from spear.models.tiny import TinyModelParams, build_tiny_model
from spear.models.tokenizer import Conversation, TokenizerParams, chat_ids, train_tokenizer
from spear.registry import Registry

if TYPE_CHECKING:
    from spear.config import Config

log = logging.getLogger(__name__)

CACHE_VERSION = 5  # bump when demo generation or training changes in a way params do not show
WARMUP_FRACTION = 0.05  # linear LR warm-up over this share of the steps, then cosine decay to 0
REPORT_FILE = "warmstart.json"
#: warm models that ship inside the package, one ``warm-<cache key>`` directory each
SHIPPED_DIR = Path(__file__).resolve().parent.parent / "data" / "warm"

#: called as ``(steps done, total steps, loss)`` after every warm-start step of a build
BuildProgress = Callable[[int, int, float], None]
_build_progress: ContextVar[BuildProgress | None] = ContextVar("warm_build_progress", default=None)


@dataclass(frozen=True, slots=True)
class WarmStartParams:
    """Everything that determines the warm model (the cache key hashes it, see :func:`key_fields`).

    ``source`` names the :data:`DEMO_SOURCES` entry and ``task`` holds that source's parameters
    (``ArithmeticParams`` or ``TextWorldDemoParams``). ``num_demos`` training tasks (arithmetic
    problems, TextWorld games) become demonstrations; ``steps`` AdamW steps of ``batch_size``
    conversations at peak learning rate ``lr``; ``frac_tool + frac_guess + frac_bad_call`` must
    be 1 (they shape arithmetic demos only).
    """

    source: str
    tokenizer: TokenizerParams
    model: TinyModelParams
    task: Any  # the source's parameter record (a frozen dataclass)
    num_demos: int
    steps: int
    batch_size: int
    lr: float
    frac_tool: float
    frac_guess: float
    frac_bad_call: float

    def __post_init__(self) -> None:
        for name in ("num_demos", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.steps < 0:
            raise ValueError(f"steps must be >= 0, got {self.steps}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        fracs = (self.frac_tool, self.frac_guess, self.frac_bad_call)
        if min(fracs) < 0 or abs(sum(fracs) - 1.0) > 1e-6:
            raise ValueError(
                f"frac_tool, frac_guess, frac_bad_call must be >= 0 and sum to 1, got {fracs}"
            )

    @classmethod
    def from_config(cls, cfg: Config, source: TaskSource | None = None) -> WarmStartParams:
        """The warm-start parameters of a run configuration (``model.tiny``, ``model.warm_start``
        and, through the task's demonstration source, the task settings). ``source`` is the
        run's task source (default: the one ``task.name`` names); a task without its own entry
        in :data:`DEMO_SOURCES` warm starts on its scripted demonstrations
        (:mod:`spear.models.scripted_demos`)."""
        name = source.name if source is not None else cfg.task.name
        if name in DEMO_SOURCES:
            source_name, task = name, DEMO_SOURCES.get(name)().params_from_config(cfg)
        else:
            source_name, task = SCRIPTED, _scripted_params(cfg, source)
        t, w = cfg.model.tiny, cfg.model.warm_start
        return cls(
            source=source_name,
            tokenizer=TokenizerParams(vocab_size=t.vocab_size),
            model=TinyModelParams(
                hidden_size=t.hidden_size,
                intermediate_size=t.intermediate_size,
                num_layers=t.num_layers,
                num_heads=t.num_heads,
                max_position_embeddings=t.max_position_embeddings,
            ),
            task=task,
            num_demos=w.num_demos,
            steps=w.steps,
            batch_size=w.batch_size,
            lr=w.lr,
            frac_tool=w.frac_tool,
            frac_guess=w.frac_guess,
            frac_bad_call=w.frac_bad_call,
        )

    def cache_key(self, seed: int) -> str:
        blob = json.dumps(
            {"params": key_fields(self), "seed": seed, "version": CACHE_VERSION}, sort_keys=True
        )
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _scripted_params(cfg: Config, source: TaskSource | None) -> Any:
    from spear.config import ConfigError
    from spear.models.scripted_demos import ScriptedDemoParams, has_demonstration
    from spear.tasks import build_task

    source = source if source is not None else build_task(cfg)
    if not has_demonstration(source):
        raise ConfigError(
            f"task.name={cfg.task.name} has no warm start for the built-in tiny model (it has "
            f"one for: {', '.join(n for n in DEMO_SOURCES.names() if n != SCRIPTED)}, and for tasks with a "
            "demonstration(task) method, e.g. FunctionTask(demonstration=...)); set model.path "
            "to a pretrained model"
        )
    return ScriptedDemoParams.from_source(cfg, source)


def key_fields(params: WarmStartParams) -> dict[str, Any]:
    """The fields the cache key hashes: every field, nested records included, except those
    marked ``metadata={"cache_key": False}`` (where files live, worker counts).

    ``source`` is left out for ``"arithmetic"``, the only source before the registry existed,
    so arithmetic warm models cached by earlier versions keep their keys; the other sources'
    parameter records have different fields, so keys of different sources never collide.
    """
    out = _record_key_fields(params)
    if out["source"] == "arithmetic":
        del out["source"]
    return out


def _record_key_fields(obj: Any, marker: str = "cache_key") -> Any:
    """``obj`` as plain data, leaving out the fields whose metadata sets ``marker`` False."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {
            f.name: _record_key_fields(getattr(obj, f.name), marker)
            for f in dataclasses.fields(obj)
            if f.metadata.get(marker, True)
        }
    if isinstance(obj, tuple | list):
        return [_record_key_fields(v, marker) for v in obj]
    return obj


# ----------------------------------------------------------------------------------------------
# Demonstration sources


@dataclass(frozen=True, slots=True)
class DemoSource:
    """How one task family makes warm-start demonstrations.

    ``params_from_config(cfg)`` returns the source's parameter record (a frozen dataclass: it is
    hashed into the cache key); ``make_demos(params, seed)`` returns the training conversations
    and a few counts for the warm model's report.
    """

    params_from_config: Callable[[Config], Any]
    make_demos: Callable[[WarmStartParams, int], tuple[list[Conversation], dict[str, float]]]


#: task name -> a loader of its demonstration source (loaders keep optional imports lazy)
DEMO_SOURCES: Registry[Callable[[], DemoSource]] = Registry("warm-start demonstration source")


@DEMO_SOURCES.register("arithmetic")
def _arithmetic_source() -> DemoSource:
    def make(params: WarmStartParams, seed: int) -> tuple[list[Conversation], dict[str, float]]:
        return make_demos(ArithmeticTasks(params.task), params, seed), {}

    return DemoSource(params_from_config=ArithmeticTasks.params_from_config, make_demos=make)


SCRIPTED = "scripted"  # the source of tasks that script their own demonstrations


@DEMO_SOURCES.register(SCRIPTED)
def _scripted_source() -> DemoSource:
    from spear.models.scripted_demos import make_scripted_demos

    def no_config(cfg: Config) -> Any:
        raise ValueError("scripted demonstrations take their parameters from the task source")

    return DemoSource(params_from_config=no_config, make_demos=make_scripted_demos)


@DEMO_SOURCES.register("lookup")
def _lookup_source() -> DemoSource:
    from spear.envs.lookup import LookupTasks
    from spear.models.lookup_demos import make_lookup_demos

    return DemoSource(
        params_from_config=LookupTasks.params_from_config, make_demos=make_lookup_demos
    )


@DEMO_SOURCES.register("textworld")
def _textworld_source() -> DemoSource:
    from spear.models.textworld_demos import TextWorldDemoParams, make_textworld_demos

    return DemoSource(
        params_from_config=TextWorldDemoParams.from_config, make_demos=make_textworld_demos
    )


# ----------------------------------------------------------------------------------------------
# Encoding and training


def encode_with_mask(tok: PreTrainedTokenizerFast, conv: Conversation) -> tuple[Tensor, Tensor]:
    """Token ids ``[T]`` of ``conv`` and the assistant mask ``[T]`` (1 on tokens the model writes).

    Each assistant turn covers the tokens after the rendering of the conversation before it with
    the generation prompt, up to and including the end-of-turn token; this relies on (and checks)
    the template's prefix stability.
    """
    full = chat_ids(tok, conv, generation_prompt=False)
    mask = [0] * len(full)
    eos = tok.eos_token_id
    for k, m in enumerate(conv.messages):
        if m.get("role") != "assistant":
            continue
        head = chat_ids(tok, Conversation(conv.messages[:k], conv.tools), generation_prompt=True)
        turn = chat_ids(
            tok, Conversation(conv.messages[: k + 1], conv.tools), generation_prompt=False
        )
        if turn[: len(head)] != head or full[: len(turn)] != turn:
            raise ValueError(f"chat template is not prefix-stable at message {k}")
        end = len(turn)
        while end > len(head) and turn[end - 1] != eos:
            end -= 1
        if end == len(head):
            raise ValueError(f"assistant message {k} renders without an end-of-turn token")
        mask[len(head) : end] = [1] * (end - len(head))
    return torch.tensor(full, dtype=torch.long), torch.tensor(mask, dtype=torch.bool)


def masked_nll(logits: Tensor, input_ids: Tensor, loss_mask: Tensor) -> Tensor:
    """Mean negative log-likelihood of the masked tokens.

    ``logits`` ``[N, T, V]`` (position ``t`` predicts token ``t+1``), ``input_ids`` ``[N, T]``,
    ``loss_mask`` ``[N, T]`` (1 where token ``t`` is a target; position 0 is never one).
    Returns a scalar; 0 when no token is masked in.
    """
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)  # [N, T-1, V]
    target = input_ids[:, 1:]  # [N, T-1]
    nll = -logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)  # [N, T-1]
    m = loss_mask[:, 1:].to(nll.dtype)  # [N, T-1]
    return (nll * m).sum() / m.sum().clamp(min=1.0)


def lr_factor(step: int, total: int) -> float:
    """Linear warm-up over ``WARMUP_FRACTION`` of ``total`` steps, then cosine decay to 0."""
    warm = max(1, round(WARMUP_FRACTION * total))
    if step < warm:
        return (step + 1) / warm
    frac = (step - warm) / max(1, total - warm)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, frac)))


def collate(
    examples: Sequence[tuple[Tensor, Tensor]], pad_id: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Right-pad ``(ids, mask)`` pairs into ``ids`` ``[N, T]``, ``attention`` and ``mask``."""
    n, t = len(examples), max(int(ids.numel()) for ids, _ in examples)
    ids = torch.full((n, t), pad_id, dtype=torch.long)
    attn = torch.zeros((n, t), dtype=torch.long)
    mask = torch.zeros((n, t), dtype=torch.bool)
    for i, (x, m) in enumerate(examples):
        ids[i, : x.numel()], attn[i, : x.numel()], mask[i, : x.numel()] = x, 1, m
    return ids, attn, mask


SNAPSHOT_EVERY_S = 30.0  # a build stopped later than this resumes from its last snapshot


def _save_snapshot(path: Path, state: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)  # a snapshot is whole or absent


def examples_digest(examples: Sequence[tuple[Tensor, Tensor]]) -> str:
    """SHA-256 of the encoded demonstrations (ids and masks): what a snapshot was trained on."""
    h = hashlib.sha256()
    for ids, mask in examples:
        h.update(ids.to(torch.int64).numpy().tobytes())
        h.update(mask.to(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _matching_snapshot(snapshot: Path | None, digest: str) -> dict[str, Any] | None:
    """The snapshot's state when it was trained on these demonstrations, else None (a snapshot
    left by a build of other demonstrations under the same key, e.g. after a code change, is
    ignored with a warning instead of crashing the build)."""
    if snapshot is None or not snapshot.exists():
        return None
    state = torch.load(snapshot, map_location="cpu", weights_only=False)
    if state.get("examples") != digest:
        log.warning("ignoring %s: it was trained on other demonstrations", snapshot.name)
        return None
    return dict(state)


def train_warm_start(
    model: torch.nn.Module,
    examples: Sequence[tuple[Tensor, Tensor]],
    params: WarmStartParams,
    pad_id: int,
    seed: int,
    on_step: Callable[[int, float], None] | None = None,
    snapshot: Path | None = None,
) -> list[float]:
    """``params.steps`` AdamW steps on shuffled batches of ``examples``; returns the losses.

    With ``snapshot``, the whole training state (weights, optimizer, data order, generators,
    losses) is saved there every :data:`SNAPSHOT_EVERY_S` seconds, and a snapshot found there
    is resumed from: the result equals an uninterrupted run's."""
    if not examples:
        raise ValueError("train_warm_start needs at least one example")
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=params.lr, weight_decay=0.0)
    order: list[int] = []
    losses: list[float] = []
    start = 0
    digest = examples_digest(examples)
    state = _matching_snapshot(snapshot, digest)
    if snapshot is not None and state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        gen.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        order, losses, start = state["order"], state["losses"], state["step"]
        log.info("warm start resumes at step %d/%d (%s)", start, params.steps, snapshot.name)
    saved_at = time.monotonic()
    model.train()
    for step in range(start, params.steps):
        if len(order) < params.batch_size:
            order += torch.randperm(len(examples), generator=gen).tolist()
        picked, order = order[: params.batch_size], order[params.batch_size :]
        ids, attn, mask = collate([examples[i] for i in picked], pad_id)
        for group in opt.param_groups:
            group["lr"] = params.lr * lr_factor(step, params.steps)
        loss = masked_nll(model(input_ids=ids, attention_mask=attn).logits, ids, mask)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(float(loss.detach()))
        if snapshot is not None and time.monotonic() - saved_at >= SNAPSHOT_EVERY_S:
            state = {"step": step + 1, "model": model.state_dict(), "order": order,
                     "optimizer": opt.state_dict(), "generator": gen.get_state(),
                     "torch_rng": torch.get_rng_state(), "losses": losses,
                     "examples": digest}  # fmt: skip
            _save_snapshot(snapshot, state)
            saved_at = time.monotonic()
        if on_step is not None:
            on_step(step, losses[-1])
    model.eval()
    return losses


# ----------------------------------------------------------------------------------------------
# Build and cache


@contextmanager
def report_build_progress(callback: BuildProgress) -> Iterator[None]:
    """Within the block, warm-model builds report every step to ``callback`` (a display's
    progress bar) instead of logging a line every tenth of the steps."""
    token = _build_progress.set(callback)
    try:
        yield
    finally:
        _build_progress.reset(token)


def _progress(total: int) -> Callable[[int, float], None]:
    report = _build_progress.get()
    if report is not None:
        return lambda step, loss: report(step + 1, total, loss)
    every = max(1, total // 10)

    def on_step(step: int, loss: float) -> None:
        if (step + 1) % every == 0 or step + 1 == total:
            log.info("warm start step %d/%d loss %.4f", step + 1, total, loss)

    return on_step


def build_warm_model(
    out_dir: Path, params: WarmStartParams, seed: int, snapshot: Path | None = None
) -> dict[str, Any]:
    """Build tokenizer, model and warm start into ``out_dir``; return the report written there.
    ``snapshot``: where the warm start saves and resumes its progress (see
    :func:`train_warm_start`)."""
    start = time.perf_counter()
    demos, demo_report = DEMO_SOURCES.get(params.source)().make_demos(params, seed)
    tok = train_tokenizer(demos, params.tokenizer)
    examples = [encode_with_mask(tok, c) for c in demos]
    longest = max(int(ids.numel()) for ids, _ in examples)
    if longest > params.model.max_position_embeddings:
        raise ValueError(
            f"a demonstration has {longest} tokens, more than max_position_embeddings="
            f"{params.model.max_position_embeddings}"
        )
    model = build_tiny_model(params.model, tok, seed)
    prep_s = time.perf_counter() - start
    losses = train_warm_start(
        model, examples, params, tok.pad_token_id, seed, _progress(params.steps), snapshot
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    tail = losses[-max(1, len(losses) // 10) :]
    report = {
        "params": _record_key_fields(params, "report"),
        "seed": seed,
        "version": CACHE_VERSION,
        "vocab_size": len(tok),
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "demo_tokens_mean": sum(int(i.numel()) for i, _ in examples) / len(examples),
        "demo_tokens_max": longest,
        "demo_conversations": len(examples),
        **demo_report,
        "first_loss": losses[0] if losses else None,
        "final_loss": sum(tail) / len(tail) if tail else None,
        "prep_seconds": prep_s,
        "build_seconds": time.perf_counter() - start,
    }
    (out_dir / REPORT_FILE).write_text(json.dumps(report, indent=1))
    return report


def find_warm_model(cache_dir: Path, params: WarmStartParams, seed: int) -> Path | None:
    """The directory of an existing warm model for ``(params, seed)``: the one shipped in the
    package if there is one of this key, else the cached one; None when it must be built."""
    name = f"warm-{params.cache_key(seed)}"
    for place in (SHIPPED_DIR, Path(cache_dir).expanduser()):
        if (place / name / REPORT_FILE).exists():
            return place / name
    return None


def ensure_warm_model(cache_dir: Path, params: WarmStartParams, seed: int) -> Path:
    """The directory of the warm model for ``(params, seed)``: shipped, cached, or built once.

    The directory loads with ``AutoModelForCausalLM`` / ``AutoTokenizer.from_pretrained``. It is
    built in a temporary directory next to its final place and renamed into place, so a crash
    never leaves a half-written model. Processes that need the same model at once (the jobs of
    ``spear compare``) take turns on the lock file ``.warm-<key>.lock``: one builds, the others
    wait and then load its model instead of building it again.
    """
    cache_dir = Path(cache_dir).expanduser()
    found = find_warm_model(cache_dir, params, seed)
    if found is None:  # build it, or wait while another process (a compare job) builds it
        cache_dir.mkdir(parents=True, exist_ok=True)
        lock = FileLock(cache_dir / f".warm-{params.cache_key(seed)}.lock")
        try:
            lock.acquire(timeout=0)
        except Timeout:
            log.info("waiting for another process that is building this warm model")
            lock.acquire()
        try:
            return find_warm_model(cache_dir, params, seed) or _build(cache_dir, params, seed)
        finally:
            lock.release()
    where = "shipped" if found.parent == SHIPPED_DIR else "cached"
    log.info("using the %s warm model %s", where, found)
    return found


def _build(cache_dir: Path, params: WarmStartParams, seed: int) -> Path:
    """Build the warm model in ``.building-<key>-*`` and rename it into place (the caller holds
    the key's lock). A ``.building-<key>-*`` left by a build that was killed outright (SIGKILL,
    out of memory: no ``finally`` ran) is removed first: under the lock no other process can be
    building this key."""
    key = params.cache_key(seed)
    final = cache_dir / f"warm-{key}"
    snapshot = cache_dir / f".resume-{final.name}.pt"  # kept when a build is stopped
    for stale in cache_dir.glob(f".building-{key}-*"):
        log.info("removing %s, left by a build that was killed", stale.name)
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".building-{key}-", dir=cache_dir))
    try:
        log.info(
            "building the warm model (tokenizer, tiny model, %d warm-start steps)", params.steps
        )
        build_warm_model(tmp, params, seed, snapshot)
        try:
            os.replace(tmp, final)
        except OSError:
            if not (final / REPORT_FILE).exists():
                raise
    except KeyboardInterrupt:
        raise Interrupted(_build_kept(snapshot)) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    snapshot.unlink(missing_ok=True)
    return final


def _build_kept(snapshot: Path) -> str:
    """What an interrupted warm-model build leaves for the next one."""
    if not snapshot.exists():
        return "the warm start is not cached yet (the next run builds it again)"
    step = torch.load(snapshot, map_location="cpu", weights_only=False)["step"]
    return f"the warm start's progress is kept (the next run resumes it at step {step})"
