"""Rollout workers (RayEngineGroup) on a local 2-CPU Ray cluster (opt in: ``-m ray``)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch

from spear.distributed.rollout import (
    EngineReplica,
    HFReplica,
    HFReplicaFactory,
    RayEngineGroup,
    WorkerParams,
    chunk_bounds,
    cpu_state_dict,
    draw_seeds,
    generator_from,
)
from spear.rollout.engine import Generation, HFEngine, KeepsTurns, SamplingParams
from tests.distributed.test_workers import PROMPTS, SAMPLING, _Tok, tiny_lm

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.ray


def _params(workers: int, timeout: float = 60.0) -> WorkerParams:
    return WorkerParams(
        num_workers=workers,
        num_cpus=0.25,
        num_gpus=0.0,
        call_timeout_s=timeout,
        start_timeout_s=60.0,
    )


def _ids(gens: Sequence[Generation]) -> list[tuple[list[int], list[float]]]:
    return [(g.token_ids, g.logprobs) for g in gens]


def test_replica_zero_continues_the_callers_stream_and_two_split_the_batch(cluster: None) -> None:
    local = HFEngine(tiny_lm(), _Tok())
    group = RayEngineGroup(HFReplicaFactory(tiny_lm(), _Tok(), "cpu", 1), _params(2))
    try:
        # one prompt: one chunk, on replica 0, sampled from the caller's own stream -- exactly
        # what the in-process engine does, and the advanced state comes back each call
        g_local, g_group = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
        for prompt in PROMPTS[:2]:
            assert _ids(group.generate([prompt], SAMPLING, generator=g_group)) == _ids(
                local.generate([prompt], SAMPLING, generator=g_local)
            )
        assert torch.equal(g_group.get_state(), g_local.get_state())
        # five prompts: rows 3-4 from a seed drawn from the caller's stream, rows 0-2 from the rest
        g = torch.Generator().manual_seed(4)
        got = group.generate(PROMPTS, SAMPLING, generator=g)
        ref = torch.Generator().manual_seed(4)
        seeds = draw_seeds(ref, 1)  # drawn first, then replica 0 continues the stream
        state = ref.get_state()
        (a, b), (c, d) = chunk_bounds(len(PROMPTS), 2)
        want = local.generate(PROMPTS[a:b], SAMPLING, generator=generator_from(state))
        want += local.generate(PROMPTS[c:d], SAMPLING, generator=generator_from(seeds[0]))
        assert _ids(got) == _ids(want)
        # the driver's engine can take chunk 0 itself: the same split, the same tokens
        with_driver = RayEngineGroup(
            HFReplicaFactory(tiny_lm(), _Tok(), "cpu", 1),
            _params(1),
            local=HFEngine(tiny_lm(), _Tok()),
        )
        try:
            g_driver = torch.Generator().manual_seed(4)
            assert _ids(with_driver.generate(PROMPTS, SAMPLING, generator=g_driver)) == _ids(want)
            assert torch.equal(g_driver.get_state(), g.get_state())
        finally:
            with_driver.shutdown()
        # pushed weights are what the replicas sample from; per-prompt token caps are honoured
        other = tiny_lm(seed=1)
        group.push_state(cpu_state_dict(other))
        pushed = group.generate(
            PROMPTS[:1], SAMPLING, max_new_tokens=[3], generator=generator_from(state)
        )
        want = HFEngine(other, _Tok()).generate(
            PROMPTS[:1], SAMPLING, max_new_tokens=[3], generator=generator_from(state)
        )
        assert _ids(pushed) == _ids(want) and len(pushed[0].token_ids) <= 3
        assert group.stats.weight_syncs == 1 and group.stats.restarts == 0
        # the agent loop's end-of-rollout hook reaches every replica (the freeing itself is
        # tested in-process in test_workers.py)
        assert isinstance(group, KeepsTurns)
        group.drop_kept_rows()
        assert group.stats.restarts == 0
    finally:
        group.shutdown()


class _SlowOnce:
    """An HF replica whose first generate anywhere (a marker file) hangs for 60 s."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker
        self.inner = HFReplica(tiny_lm(), _Tok(), "cpu")

    def generate(
        self, prompts: Sequence[Sequence[int]], params: SamplingParams, **kw: object
    ) -> list[Generation]:
        if not self.marker.exists():
            self.marker.write_text("hung once")
            time.sleep(60)
        return self.inner.generate(prompts, params, **kw)  # type: ignore[arg-type]

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.inner.load_state_dict(state)


class _SlowOnceFactory:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __call__(self) -> EngineReplica:
        torch.set_num_threads(1)
        return _SlowOnce(self.marker)


def test_a_replica_missing_its_deadline_or_dying_is_restarted(
    cluster: None, tmp_path: Path
) -> None:
    group = RayEngineGroup(_SlowOnceFactory(tmp_path / "marker"), _params(1, timeout=2.0))
    try:
        other = tiny_lm(seed=2)
        group.push_state(cpu_state_dict(other))
        pid = ray.get(group.actor(0).ping.remote())
        t0 = time.monotonic()
        got = group.generate(PROMPTS, SAMPLING, generator=torch.Generator().manual_seed(1))
        assert time.monotonic() - t0 < 40  # the 2 s deadline, not the 60 s hang
        assert group.stats.timeouts == 1 and group.stats.restarts == 1
        assert ray.get(group.actor(0).ping.remote()) != pid
        # the fresh replica got the pushed weights and the same randomness: the same answer
        want = HFEngine(other, _Tok()).generate(
            PROMPTS, SAMPLING, generator=torch.Generator().manual_seed(1)
        )
        assert _ids(got) == _ids(want)
        ray.kill(group.actor(0))  # a dead process is a crash: restarted on the next call
        again = group.generate(PROMPTS, SAMPLING, generator=torch.Generator().manual_seed(1))
        assert _ids(again) == _ids(want)
        assert group.stats.crashes == 1 and group.stats.restarts == 2
    finally:
        group.shutdown()
