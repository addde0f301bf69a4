"""The trained policy: model, tokenizer, optimizer and LR schedule, and token log-probs.

Log-probs follow the token convention of :mod:`spear.types`: ``logprobs[:, t]`` is the log-prob of
``input_ids[:, t]`` given the prefix, computed from the hidden state at ``t - 1`` and projected
through the LM head chunk by chunk (:func:`spear.algo.logprobs.logprobs_from_hidden`), so the
full ``[N, T, V]`` logits are never materialised in float32.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from spear.algo.logprobs import logprobs_from_hidden
from spear.config import Config, OptimConfig
from spear.models.prefix import plan_shared_prefix, run_prefix_plan, supports_prefix_sharing
from spear.types import TokenBatch

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
LOGPROB_CHUNK = 1024  # token rows projected through the LM head at once


class ModelLoadError(RuntimeError):
    """The model or tokenizer could not be loaded; the message says from where and why."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(
            "trainer.device=cuda but no CUDA device is available; use trainer.device=cpu"
        )
    return torch.device(name)


def _softcap(cap: float) -> Callable[[Tensor], Tensor]:
    return lambda logits: torch.tanh(logits / cap) * cap


def _times(scale: float) -> Callable[[Tensor], Tensor]:
    return lambda logits: logits * scale


def _over(scale: float) -> Callable[[Tensor], Tensor]:
    return lambda logits: logits / scale


# Config fields with which a transformers causal LM changes its logits after the LM head, as
# its ``forward`` does (Gemma 2 soft-capping, Cohere and Granite scaling): (the value that
# changes nothing, the transform of a value).
LOGIT_TRANSFORMS: dict[str, tuple[float | None, Callable[[float], Callable[[Tensor], Tensor]]]] = {
    "final_logit_softcapping": (None, _softcap),
    "logit_scale": (1.0, _times),
    "logits_scaling": (1.0, _over),
}


def logit_transform(config: Any) -> tuple[str, Callable[[Tensor], Tensor]] | None:
    """``("field=value", transform)`` of the first :data:`LOGIT_TRANSFORMS` field that
    ``config`` (or its text config) sets to a value that changes the logits, else None."""
    if config is None:
        return None
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name, (neutral, make) in LOGIT_TRANSFORMS.items():
        value = getattr(text, name, None)
        if isinstance(value, int | float) and value != neutral:
            return f"{name}={value}", make(float(value))
    return None


def load_pretrained(path: str, tokenizer_path: str | None, dtype: str) -> tuple[nn.Module, Any]:
    """Load a Hugging Face causal LM and tokenizer from a local dir (or hub id if online)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    local = path.startswith(("/", ".", "~")) or "/" not in path  # else maybe a hub id "org/name"
    if local and not Path(path).expanduser().exists():
        raise ModelLoadError(f"model.path {path!r} does not exist")
    try:
        tok = AutoTokenizer.from_pretrained(tokenizer_path or path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=_DTYPES[dtype])
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot load model.path={path!r}: {str(e).splitlines()[0]}") from None
    transform = logit_transform(getattr(model, "config", None))
    if transform is not None:
        log.info("model.path=%r sets %s: training log-probs apply it too", path, transform[0])
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    if getattr(tok, "chat_template", None) is None:
        raise ModelLoadError(f"the tokenizer at {tokenizer_path or path!r} has no chat template")
    return model, tok


def apply_lora(model: nn.Module, cfg: Config) -> nn.Module:
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise ModelLoadError(
            "model.lora.enabled=true needs peft: pip install 'spear[lora]'"
        ) from None
    lc = cfg.model.lora
    peft_cfg = LoraConfig(
        r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout, target_modules=lc.target_modules
    )
    return get_peft_model(model, peft_cfg)  # type: ignore[arg-type]


def build_optimizer(
    params: list[nn.Parameter], cfg: OptimConfig, total_steps: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """AdamW plus a per-training-step LR schedule (warm-up, then constant / cosine / linear)."""
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)

    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.lr_schedule == "constant":
            return 1.0
        frac = min(1.0, (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
        return 0.5 * (1 + math.cos(math.pi * frac)) if cfg.lr_schedule == "cosine" else 1.0 - frac

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def loss_positions(loss_mask: Tensor) -> tuple[Tensor, Tensor]:
    """``(rows, cols)`` of the tokens whose log-prob is needed: ``loss_mask > 0``, column 0 excluded
    (it has no prefix). Row-major order."""
    where = loss_mask > 0
    where[:, 0] = False
    rows, cols = where.nonzero(as_tuple=True)
    return rows, cols


def scatter_tokens(values: Tensor, rows: Tensor, cols: Tensor, shape: torch.Size) -> Tensor:
    """``values [1, M]`` placed at ``(rows, cols)`` of a zero ``[N, T]`` tensor (differentiable)."""
    return values.new_zeros(shape).index_put((rows, cols), values[0])


def unscored_prefix(loss_mask: Tensor, attention_mask: Tensor) -> Tensor:
    """Leading tokens per row whose hidden states no log-prob reads: everything before the token
    that precedes the row's first scored position (the whole row if none is scored). ``[N]``."""
    scored = loss_mask > 0
    scored[:, 0] = False
    cols = torch.arange(loss_mask.shape[1], device=loss_mask.device).expand_as(loss_mask)
    first = torch.where(scored, cols, loss_mask.shape[1]).amin(dim=1)  # [N]
    return torch.minimum(first - 1, attention_mask.sum(dim=1))


def length_order(attention_mask: Tensor) -> Tensor:
    """Row indices sorted by sequence length (ties keep row order). ``[N, T] -> [N]`` long."""
    return torch.argsort(attention_mask.sum(dim=1), stable=True)


def prefix_order(input_ids: Tensor, attention_mask: Tensor, loss_mask: Tensor) -> Tensor:
    """Row indices with rows of the same unscored prefix (:func:`unscored_prefix`) next to each
    other, prefixes in order of first appearance, shorter rows first within one (ties keep row
    order): micro-batches cut from it share their prompts. ``[N, T] -> [N]`` long."""
    q, lengths = unscored_prefix(loss_mask, attention_mask).tolist(), attention_mask.sum(1).tolist()
    ids = input_ids.tolist()
    first: dict[tuple[int, ...], int] = {}
    keys = [first.setdefault(tuple(ids[i][: q[i]]), len(first)) for i in range(len(ids))]
    return torch.tensor(sorted(range(len(ids)), key=lambda i: (keys[i], lengths[i])))


@dataclass
class Policy:
    model: nn.Module
    tokenizer: Any
    device: torch.device
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    share_prefix: bool = True  # run prefixes shared by rows once (spear.models.prefix)

    @property
    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def _base(self) -> Any:
        model: Any = self.model  # a transformers PreTrainedModel, possibly wrapped by peft
        return model.get_base_model() if hasattr(model, "get_base_model") else model

    def _decoder_and_head(self) -> tuple[Any, Any]:
        base = self._base()
        return base.get_decoder(), base.get_output_embeddings()

    def _logit_fn(self) -> Callable[[Tensor], Tensor] | None:
        """What the model's forward does to the LM head's logits (:func:`logit_transform`)."""
        transform = logit_transform(getattr(self._base(), "config", None))
        return None if transform is None else transform[1]

    def _shares_prefix(self, decoder: nn.Module) -> bool:
        """Prefix sharing is on and possible: the model's layers are all full attention
        (:func:`~spear.models.prefix.supports_prefix_sharing`), and no activation checkpointing
        is active in training mode (checkpointed transformers layers drop the KV cache then)."""
        if not (self.share_prefix and supports_prefix_sharing(getattr(decoder, "config", None))):
            return False
        checkpointed = any(getattr(m, "gradient_checkpointing", False) for m in decoder.modules())
        return not (checkpointed and decoder.training)  # some releases drop it even without grad

    def forward_logprobs(
        self, batch: TokenBatch, *, temperature: float, with_entropy: bool
    ) -> tuple[Tensor, Tensor | None]:
        """Log-probs ``[N, T]`` (and entropy ``[N, T]``) of ``batch.input_ids`` at the positions
        where ``batch.loss_mask > 0``; every other entry (prompt, observation and padding
        tokens, column 0) is 0.

        Only those positions go through the LM head and the softmax, so prompt and observation
        positions, which no loss or metric reads, cost no ``[*, V]`` projection. With
        ``share_prefix`` a prefix several rows share (the system prompt, a group's task prompt)
        runs through the decoder once (:func:`~spear.models.prefix.plan_shared_prefix`).
        """
        decoder, head = self._decoder_and_head()
        rows, cols = loss_positions(batch.loss_mask)
        plan = (
            plan_shared_prefix(
                batch.input_ids,
                batch.attention_mask,
                unscored_prefix(batch.loss_mask, batch.attention_mask),
            )
            if rows.numel() > 0 and self._shares_prefix(decoder)
            else None
        )
        # token (rows, cols) is scored from the hidden state of input column cols - 1
        if plan is None:
            hidden = decoder(
                input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False
            ).last_hidden_state  # [N, T, H]
            flat_at = rows * hidden.shape[1] + cols - 1
            scoring = hidden.flatten(0, 1).index_select(0, flat_at)  # [M, H]
        else:
            flat = torch.cat(
                [out.last_hidden_state.flatten(0, 1) for out, _ in run_prefix_plan(decoder, plan)]
            )  # [sum R * W, H]
            flat_at = plan.row_base[rows] + cols - 1 - plan.suffix_start[rows]
            scoring = flat.index_select(0, flat_at)  # [M, H]
        lp, ent = logprobs_from_hidden(
            scoring[None],
            head.weight,
            batch.input_ids[rows, cols][None],
            temperature=temperature,
            chunk_size=LOGPROB_CHUNK,
            with_entropy=with_entropy,
            logit_fn=self._logit_fn(),
        )
        shape = batch.input_ids.shape
        if rows.numel() == 0:  # nothing to score: zeros that still depend on the model
            zero = batch.input_ids.new_zeros(shape, dtype=torch.float32) + scoring.sum() * 0.0
            return zero, (zero if with_entropy else None)
        return scatter_tokens(lp, rows, cols, shape), (
            scatter_tokens(ent, rows, cols, shape) if ent is not None else None
        )

    @torch.no_grad()
    def batch_logprobs(
        self, batch: TokenBatch, *, micro_batch_size: int, temperature: float
    ) -> Tensor:
        """Log-probs of a whole batch without gradients, micro-batch by micro-batch. ``[N, T]``.

        Rows are grouped into micro-batches in order of length (:func:`length_order`), so each
        micro-batch is padded only to its own similar-length rows, or, with ``share_prefix``,
        by shared prompt first (:func:`prefix_order`); the output is in row order. Each row's
        values do not depend on its micro-batch partners beyond float rounding.
        """
        was_training = self.model.training
        self.model.eval()
        out = torch.zeros(batch.input_ids.shape, dtype=torch.float32)
        order = (
            prefix_order(batch.input_ids, batch.attention_mask, batch.loss_mask)
            if self.share_prefix
            else length_order(batch.attention_mask)
        )
        for start in range(0, batch.num_rows, micro_batch_size):
            rows = order[start : start + micro_batch_size]
            micro = batch.select(rows).to(self.device)
            lp, _ = self.forward_logprobs(micro, temperature=temperature, with_entropy=False)
            out[rows, : lp.shape[1]] = lp.float().cpu()
        self.model.train(was_training)
        return out
