"""Pure parts of the Ray backend (no Ray needed): chunking, seeding, replicas, config checks."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import LlamaConfig, LlamaForCausalLM

from spear.backends import BACKENDS
from spear.config import ConfigError, load_config
from spear.distributed.backend import (
    actor_requests,
    check_cluster_fits,
    dist_backend,
    env_call_timeout,
)
from spear.distributed.env_pool import EnvPoolError
from spear.distributed.rollout import (
    REPLICAS,
    EngineHost,
    HFReplicaFactory,
    WorkerParams,
    chunk_bounds,
    draw_seeds,
    generator_from,
)
from spear.distributed.train_ranks import load_full_state
from spear.registry import UnknownNameError
from spear.rollout.engine import HFEngine, SamplingParams


class _Tok:
    pad_token_id, eos_token_id = 0, 1


def tiny_lm(seed: int = 0, tied: bool = True) -> LlamaForCausalLM:
    cfg = LlamaConfig(
        vocab_size=48, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=tied,
    )  # fmt: skip
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).float().eval()


SAMPLING = SamplingParams(
    temperature=1.0, top_p=1.0, top_k=None, max_new_tokens=6, stop_token_ids=None, stop_strings=None
)
PROMPTS = [[2, 3, 4], [5, 6], [7, 8, 9, 10], [11], [12, 13]]


def test_chunk_bounds_hand_examples() -> None:
    assert chunk_bounds(5, 2) == [(0, 3), (3, 5)]
    assert chunk_bounds(7, 3) == [(0, 3), (3, 5), (5, 7)]  # divmod(7, 3) = (2, 1)
    assert chunk_bounds(2, 4) == [(0, 1), (1, 2)]  # idle replicas get no call
    assert chunk_bounds(0, 3) == []
    with pytest.raises(ValueError, match="workers >= 1"):
        chunk_bounds(3, 0)


@settings(max_examples=50, deadline=None)
@given(n=st.integers(0, 40), workers=st.integers(1, 9))
def test_chunk_bounds_cover_every_row_once(n: int, workers: int) -> None:
    bounds = chunk_bounds(n, workers)
    assert [i for a, b in bounds for i in range(a, b)] == list(range(n))
    sizes = [b - a for a, b in bounds]
    assert len(bounds) == min(n, workers) and (not sizes or max(sizes) - min(sizes) <= 1)


def test_draw_seeds_and_generator_from() -> None:
    g = torch.Generator().manual_seed(3)
    state = g.get_state()
    seeds = draw_seeds(g, 2)
    assert len(set(seeds)) == 2 and draw_seeds(g, 0) == []
    again = generator_from(state)  # the state before the draw gives the same draw
    assert draw_seeds(again, 2) == seeds
    a, b = generator_from(seeds[0]), generator_from(seeds[0])
    assert torch.equal(torch.rand(4, generator=a), torch.rand(4, generator=b))


def test_engine_host_equals_an_in_process_engine_and_loads_weights() -> None:
    lm = tiny_lm()
    want = HFEngine(lm, _Tok()).generate(
        PROMPTS, SAMPLING, generator=torch.Generator().manual_seed(9)
    )
    host = EngineHost(HFReplicaFactory(tiny_lm(), _Tok(), "cpu", 1))
    state = torch.Generator().manual_seed(9).get_state()
    got, after = host.generate(PROMPTS, SAMPLING, state, None)
    assert [g.token_ids for g in got] == [g.token_ids for g in want]
    assert [g.logprobs for g in got] == [g.logprobs for g in want]
    g = generator_from(state)
    HFEngine(tiny_lm(), _Tok()).generate(PROMPTS, SAMPLING, generator=g)
    assert torch.equal(after, g.get_state())  # the advanced state comes back
    other = tiny_lm(seed=1)
    assert host.load_weights(other.state_dict(), version=3) == 3
    moved, _ = host.generate(PROMPTS, SAMPLING, state, None)
    want_other = HFEngine(other, _Tok()).generate(
        PROMPTS, SAMPLING, generator=generator_from(state)
    )
    assert [g.logprobs for g in moved] == [g.logprobs for g in want_other]


def test_engine_host_frees_what_its_replica_keeps_between_turns() -> None:
    host = EngineHost(HFReplicaFactory(tiny_lm(), _Tok(), "cpu", 1))
    host.generate(PROMPTS, SAMPLING, torch.Generator().manual_seed(2).get_state(), None)
    kept = host.replica.engine._turns  # type: ignore[attr-defined]
    assert kept is not None and len(kept) == len(PROMPTS)  # every row kept for a next turn
    assert host.drop_kept_rows() is True and len(kept) == 0
    off = EngineHost(HFReplicaFactory(tiny_lm(), _Tok(), "cpu", 1, keep_turns=False))
    assert off.replica.engine._turns is None  # type: ignore[attr-defined]

    class _Plain:  # a replica that keeps nothing between calls
        def generate(self, *a: object, **k: object) -> list:
            return []

        def load_state_dict(self, state: object) -> None: ...

    assert EngineHost(_Plain).drop_kept_rows() is False


def test_load_full_state_accepts_tied_aliases_only() -> None:
    src, dst = tiny_lm(seed=1, tied=True), tiny_lm(seed=0, tied=True)
    state = {k: v for k, v in src.state_dict().items() if k != "lm_head.weight"}  # tied alias
    load_full_state(dst, state)
    assert torch.equal(dst.lm_head.weight, src.model.embed_tokens.weight)
    untied = tiny_lm(seed=0, tied=False)
    with pytest.raises(KeyError, match="lacks weights"):
        load_full_state(untied, state)
    with pytest.raises(KeyError, match="unknown keys"):
        load_full_state(dst, {**state, "extra.weight": torch.zeros(1)})


def test_cluster_fit_checks_name_the_field() -> None:
    d = load_config(overrides=["trainer.backend=ray", "distributed.train_ranks=2"]).distributed
    reqs = actor_requests(d)
    assert reqs == [("env_workers", 2, 0.25), ("rollout_workers", 1, 0.5), ("train_ranks", 2, 0.5)]
    check_cluster_fits(reqs, [2.0])  # 0.5 + 0.5 + 1.0 = 2 CPUs: fits exactly
    with pytest.raises(EnvPoolError, match=r"exceeds the Ray cluster's 1"):
        check_cluster_fits(reqs, [1.0])
    with pytest.raises(EnvPoolError, match=r"distributed.train_ranks: 3 CPUs per actor"):
        check_cluster_fits([("train_ranks", 1, 3.0)], [2.0, 2.0])
    assert dist_backend(d) == "gloo"
    assert env_call_timeout(load_config(overrides=["rollout.env_step_timeout_s=7"])) == 7.0
    assert env_call_timeout(load_config(overrides=["distributed.call_timeout_s=3"])) == 3.0
    gpu = load_config(overrides=["distributed.gpus_per_train_rank=1"]).distributed
    assert dist_backend(gpu) == "nccl"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["distributed.num_cpus=2", "distributed.cpus_per_rollout_worker=4"], "cpus_per_rollout_worker=4 exceeds num_cpus=2"),
        (["distributed.num_cpus=2", "distributed.env_workers=8"], "8 env_workers x 0.25 .* exceeds num_cpus=2"),
        (["distributed.rollout_engine=vllm"], "rollout_engine=vllm needs GPUs"),
        (["distributed.rollout_engine=vllm", "distributed.gpus_per_rollout_worker=1", "distributed.rollout_workers=0"], "set rollout_workers >= 1"),
        (["distributed.driver_generates=true", "distributed.rollout_engine=vllm", "distributed.gpus_per_rollout_worker=1"], "HF replicas only"),
        (["trainer.backend=slurm"], "trainer.backend"),
        (["distributed.cpus_per_env_worker=0"], "cpus_per_env_worker"),
    ],
)  # fmt: skip
def test_config_rejects_what_cannot_run(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(overrides=overrides)


def test_a_joined_cluster_is_checked_at_run_time_not_in_the_config() -> None:
    cfg = load_config(
        overrides=[
            "distributed.address=auto",
            "distributed.num_cpus=1",
            "distributed.env_workers=8",
        ]
    )
    assert cfg.distributed.address == "auto"  # the cluster's size is known only once joined


def test_backend_registry() -> None:
    assert BACKENDS.names() == ["local", "ray"]
    assert REPLICAS.names() == ["hf", "vllm"]
    with pytest.raises(UnknownNameError, match="Did you mean 'ray'"):
        BACKENDS.get("rya")


def test_worker_params_reject_bad_values() -> None:
    good = dict(num_workers=1, num_cpus=0.5, num_gpus=0.0, call_timeout_s=1.0, start_timeout_s=1.0)
    WorkerParams(**good)  # type: ignore[arg-type]
    for field, value in [
        ("num_workers", 0),
        ("num_cpus", 0.0),
        ("num_gpus", -1.0),
        ("call_timeout_s", float("nan")),
    ]:
        with pytest.raises(ValueError, match=field):
            WorkerParams(**{**good, field: value})  # type: ignore[arg-type]


def test_nothing_imports_ray_until_the_ray_backend_starts() -> None:
    code = (
        "import sys; import spear.trainer, spear.distributed.backend, spear.rollout.vllm_engine; "
        "assert 'ray' not in sys.modules and 'vllm' not in sys.modules, 'imported eagerly'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
