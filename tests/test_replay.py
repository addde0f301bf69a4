import io
import math
from dataclasses import replace
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from spear.replay import (
    ReplayBatch,
    ReplayBuffer,
    ReplayParams,
)
from spear.types import Sample

_NUMBERS = dict(capacity=4, history_size=100, tolerate_steps=5, sample_size=4, decay_weight=0.1)
_CHOICES = dict(
    sampling="uniform",
    recalibration="median",
    keep="positive",
    consume="clear",
    staleness="current_step",
)
BASE = {**_NUMBERS, **_CHOICES, "trigger_ratio": 1.5, "normalize_by_std": False, "std_eps": 1e-6}


def params(**over: Any) -> ReplayParams:
    return ReplayParams(**{**BASE, **over})


def buffer(seed: int = 0, **over: Any) -> ReplayBuffer:
    return ReplayBuffer(params(**over), seed=seed)


def mk(
    g: int, e: int, *, score: float, adv: float = 1.0, n: int = 3, filtered: tuple = ()
) -> Sample:
    """Group ``g``, episode ``e``: 2 prompt tokens then ``n`` response tokens (ids encode ``e``)."""
    ids = torch.arange(2 + n, dtype=torch.long) + 10 * e
    mask = torch.arange(2 + n) >= 2
    lp = torch.where(mask, -0.25 - 0.01 * torch.arange(2 + n), torch.zeros(2 + n)).float()
    s = Sample(ids, mask, lp, group_id=g, episode_id=e, score=score, advantage=adv)
    s.filtered_by = filtered
    return s


# ---------------------------------------------------------------- params validation


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("capacity", 0),
        ("capacity", 2.0),
        ("history_size", 0),
        ("tolerate_steps", -1),
        ("tolerate_steps", True),
        ("sample_size", 0),
        ("trigger_ratio", 0.0),
        ("trigger_ratio", math.inf),
        ("sampling", "greedy"),
        ("recalibration", "mean"),
        ("keep", "all"),
        ("consume", "fifo"),
        ("normalize_by_std", 1),
        ("std_eps", 0.0),
        ("decay_weight", 0.0),
        ("decay_weight", 1.5),
    ],
)
def test_params_validation_names_the_field(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=f"ReplayParams.{field}"):
        params(**{field: value})


def test_tolerate_steps_is_not_capped() -> None:
    # the reference silently caps tolerate_steps at 10; 50 must mean 50
    buf = buffer(0, tolerate_steps=50)
    buf.add([mk(0, 0, score=1.0, adv=0.5), mk(0, 1, score=0.0, adv=-0.5)], step=1)
    # group mean 0.5 -> p50 0.5; R=1 > 0.5 is eligible 50 steps later, not 51
    assert buf.eligible_count(51) == 1
    assert buf.eligible_count(52) == 0


# ---------------------------------------------------------------- the buffer: worked values


def _worked_step() -> list[Sample]:
    """Four groups with means [0, 2.5, 5, 10]; the stored samples are R=1.0 and R=10.4.

    g0: R 1.0 (adv +1) and -1.0 -> mean 0,   std sqrt(2)
    g1: 2.5, 2.5 (adv 0)        -> mean 2.5, std 0
    g2: 5, 5 (adv 0)            -> mean 5,   std 0
    g3: R 10.4 (adv +0.4), 9.6  -> mean 10,  std 0.4 * sqrt(2) = 0.5657
    """
    return [
        mk(0, 0, score=1.0, adv=1.0),
        mk(0, 1, score=-1.0, adv=-1.0),
        mk(1, 2, score=2.5, adv=0.0),
        mk(1, 3, score=2.5, adv=0.0),
        mk(2, 4, score=5.0, adv=0.0),
        mk(2, 5, score=5.0, adv=0.0),
        mk(3, 6, score=10.4, adv=0.4),
        mk(3, 7, score=9.6, adv=-0.4),
    ]


def test_buffer_recalibration_worked_values() -> None:
    buf = buffer(0)
    report = buf.add(_worked_step(), step=1)
    assert (report.offered, report.stored, report.groups_recorded) == (8, 2, 4)
    assert buf.eligible_count(2) == 1
    batch = buf.consume(2)
    assert batch.p50 == pytest.approx(3.75)
    # s50 = median of stds [0, 0, 0.5657, 1.4142] = 0.5657 / 2 = 0.2 * sqrt(2)
    assert batch.s50 == pytest.approx(0.2 * math.sqrt(2))
    assert (batch.n_before, batch.n_after_recalibration, batch.n_sampled) == (2, 1, 1)
    (s,) = batch.samples
    assert s.episode_id == 6 and s.advantage == pytest.approx(6.65)
    assert batch.mean_staleness == 1.0  # consumed at step 2, collected at step 1
    assert len(buf) == 0  # consume-and-clear


def test_buffer_recalibration_with_std_normalisation() -> None:
    buf = buffer(0, normalize_by_std=True)
    buf.add(_worked_step(), step=1)
    (s,) = buf.consume(2).samples
    # (10.4 - 3.75) / (0.2 * sqrt(2) + 1e-6) = 6.65 / 0.28284371 = 23.51151...
    assert s.advantage == pytest.approx(6.65 / (0.2 * math.sqrt(2) + 1e-6))


def test_non_negative_keeps_score_equal_to_median() -> None:
    # two groups: means 1 and 3 -> p50 = 2; stored R = 2 (adv>0 in its own group) has A = 0
    step = [
        mk(0, 0, score=2.0, adv=1.0),
        mk(0, 1, score=0.0, adv=-1.0),
        mk(1, 2, score=3.0, adv=0.0),
    ]
    for keep, expected in (("positive", 0), ("non_negative", 1)):
        buf = buffer(0, keep=keep)
        buf.add(step, step=1)
        assert buf.eligible_count(1) == expected
        assert buf.consume(1).n_sampled == expected


def test_decay_mode_scales_collected_advantage_and_keeps_all() -> None:
    buf = buffer(0, recalibration="decay", decay_weight=0.5)
    buf.add(_worked_step(), step=1)
    assert buf.eligible_count(1) == 2  # everything stored is eligible
    batch = buf.consume(1)
    # A = 0.5 * A_collected: episode 0 -> 0.5, episode 6 -> 0.2
    assert {s.episode_id: s.advantage for s in batch.samples} == pytest.approx({0: 0.5, 6: 0.2})


def test_what_is_stored() -> None:
    buf = buffer(0, recalibration="decay")
    report = buf.add(
        [
            mk(0, 0, score=1.0, adv=0.5),  # stored
            mk(0, 1, score=1.0, adv=0.0),  # A = 0: not stored
            mk(0, 2, score=1.0, adv=-0.5),  # negative
            mk(0, 3, score=1.0, adv=0.5, filtered=("repetitive",)),  # response-filtered
            mk(0, 4, score=1.0, adv=0.5, n=0),  # no response token
        ],
        step=3,
    )
    assert (report.stored, report.groups_recorded) == (1, 1)
    (s,) = buf.consume(3).samples
    assert s.episode_id == 0


def test_storage_is_compact_and_returned_samples_are_usual() -> None:
    buf = buffer(0, recalibration="decay")
    original = mk(0, 0, score=1.0, adv=0.5)
    buf.add([original], step=2)
    stored = buf.state_dict()
    assert stored["input_ids"].dtype == torch.int32
    assert stored["loss_mask"].dtype == torch.bool
    assert stored["behavior_logprobs"].dtype == torch.float32
    original.behavior_logprobs.add_(100.0)  # the buffer holds its own copy
    (s,) = buf.consume(2).samples
    assert s.input_ids.dtype == torch.long and torch.equal(s.input_ids, original.input_ids)
    # collection-time behaviour log-probs are kept as they were
    assert torch.equal(s.behavior_logprobs, mk(0, 0, score=1.0).behavior_logprobs)
    assert s.step == 2


def test_stored_tensors_are_host_copies_with_own_storage() -> None:
    # inputs as the old-log-prob stage makes them: row views of one [N, T] batch tensor, with
    # autograd history; the buffer must keep compact copies, not the batch
    batch_lp = torch.randn(4, 50, requires_grad=True) * 1.0  # [N, T], non-leaf
    batch_ids = torch.arange(200).reshape(4, 50)
    samples = []
    for i in range(4):
        s = mk(0, i, score=float(i), adv=1.0, n=48)
        s.input_ids, s.behavior_logprobs = batch_ids[i], batch_lp[i]
        s.loss_mask = s.loss_mask.float()  # a float 0/1 mask is accepted too
        samples.append(s)
    buf = buffer(0, recalibration="decay")
    buf.add(samples, step=1)
    # 50 tokens x (4 + 1 + 4) bytes per sample: no storage is shared with the [4, 50] batch
    assert buf.nbytes() == 4 * 50 * 9
    out = buf.consume(1).samples
    for s, src in zip(out, samples):
        for name in ("input_ids", "loss_mask", "behavior_logprobs"):
            t = getattr(s, name)
            assert t.device.type == "cpu" and not t.requires_grad and t.is_contiguous()
        assert s.loss_mask.dtype == torch.bool
        assert torch.equal(s.behavior_logprobs, src.behavior_logprobs.detach())


def test_meta_tensors_are_rejected_and_leave_buffer_unchanged() -> None:
    buf = buffer(0)
    buf.add(_positives(4), step=1)
    before = buf.state_dict()
    s = mk(9, 90, score=1.0, adv=1.0)
    s.behavior_logprobs = torch.zeros(s.num_tokens, device="meta")
    with pytest.raises(ValueError, match=r"behavior_logprobs.*meta"):
        buf.add([s], step=2)
    s = mk(9, 91, score=1.0, adv=1.0)
    s.input_ids = torch.zeros(s.num_tokens, dtype=torch.long, device="meta")
    with pytest.raises(ValueError, match=r"input_ids.*meta"):
        buf.add([s], step=2)
    after = buf.state_dict()
    assert after["scalars"] == before["scalars"]
    assert torch.equal(after["hist_means"], before["hist_means"]) and len(buf) == 4


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_accelerator_tensors_end_up_on_cpu() -> None:
    s = mk(0, 0, score=1.0, adv=1.0)
    s.input_ids, s.loss_mask = s.input_ids.cuda(), s.loss_mask.cuda()
    s.behavior_logprobs = s.behavior_logprobs.cuda().to(torch.bfloat16)
    buf = buffer(0, recalibration="decay")
    buf.add([s], step=1)
    (out,) = buf.consume(1).samples
    for name in ("input_ids", "loss_mask", "behavior_logprobs"):
        assert getattr(out, name).device.type == "cpu"
    assert torch.equal(out.behavior_logprobs, s.behavior_logprobs.float().cpu())


def test_logprob_precision() -> None:
    # bfloat16 / float16 / float32 log-probs are kept exactly; float64 ones are rounded to float32
    buf = buffer(0, recalibration="decay", sample_size=10)
    exact = {}
    for i, dtype in enumerate((torch.bfloat16, torch.float16, torch.float32, torch.float64)):
        s = mk(i, i, score=1.0, adv=1.0)
        s.behavior_logprobs = (-torch.rand(s.num_tokens, dtype=torch.float64) / 3).to(dtype)
        exact[i] = s.behavior_logprobs.float()
        buf.add([s], step=1)
    for s in buf.consume(1).samples:
        assert s.behavior_logprobs.dtype == torch.float32
        assert torch.equal(s.behavior_logprobs, exact[s.episode_id])


def test_ids_outside_int32_are_rejected() -> None:
    s = mk(0, 0, score=1.0, adv=1.0)
    s.input_ids = s.input_ids + 2**31
    with pytest.raises(ValueError, match="int32"):
        buffer(0).add([s], step=1)
    s.input_ids = torch.arange(s.num_tokens, dtype=torch.float32)
    with pytest.raises(ValueError, match="integer"):
        buffer(0).add([s], step=1)


# ---------------------------------------------------------------- trigger, sample size


def _positives(n: int, *, first_group: int = 0, first_episode: int = 0) -> list[Sample]:
    """``n`` stored-positive samples: groups of 4 + 4 episodes (scores 1 / 0) -> every group mean
    is 0.5 and every R = 1 survives recalibration. ``n`` must be a multiple of 4."""
    out = []
    for g in range(n // 4):
        for j in range(8):
            good = j < 4
            gid, eid = first_group + g, first_episode + 8 * g + j
            out.append(mk(gid, eid, score=float(good), adv=0.5 if good else -0.5, n=1))
    return out


def test_capacity_trigger_is_strict() -> None:
    # §11: B = 2048, ratio 1.5 -> 3072 eligible does not trigger, 3073 does
    buf = buffer(0, capacity=2048, sample_size=2048)
    buf.add(_positives(3072), step=1)
    assert buf.eligible_count(2) == 3072 and not buf.ready(2)
    # one more group (scores 1 / 0, mean 0.5): p50 stays 0.5, one more eligible
    buf.add(
        [mk(10_000, 99_000, score=1.0, adv=0.5, n=1), mk(10_000, 99_001, score=0.0, adv=-0.5, n=1)],
        step=2,
    )
    assert buf.eligible_count(3) == 3073 and buf.ready(3)
    batch = buf.consume(3)
    assert (batch.n_after_recalibration, batch.n_sampled) == (3073, 2048)
    assert len({s.episode_id for s in batch.samples}) == 2048


def test_sample_size_need_not_be_power_of_two() -> None:
    # §11: 3500 survivors -> 2048 replayed with sample_size 2048; any other size is honoured
    buf = buffer(0, capacity=2048, sample_size=2048)
    buf.add(_positives(3500), step=1)
    assert buf.consume(1).n_sampled == 2048
    buf = buffer(0, capacity=2, sample_size=3)
    buf.add(_positives(8), step=1)
    assert buf.consume(1).n_sampled == 3


# ---------------------------------------------------------------- staleness, history, modes


def test_staleness_is_relative_to_current_step() -> None:
    buf = buffer(0, tolerate_steps=2)
    buf.add(_positives(4), step=1)
    buf.add([], step=2)  # nothing newer is ever stored
    assert buf.eligible_count(3) == 4  # 3 - 1 = 2 <= 2
    assert buf.eligible_count(4) == 0  # 4 - 1 = 3 > 2 (the reference would keep them)
    batch = buf.consume(4)
    assert (batch.evicted_stale, batch.n_sampled) == (4, 0)
    assert batch.samples == [] and isinstance(batch, ReplayBatch)


def test_newest_entry_clock_keeps_successes_through_a_drought() -> None:
    # the reference's clock (§2.3): samples age only when a step adds, against the newest stored
    buf = buffer(0, tolerate_steps=2, staleness="newest_entry")
    buf.add(_positives(4), step=1)
    for t in range(2, 9):
        buf.add([], step=t)  # a drought: nothing is stored, nothing ages
    assert buf.eligible_count(9) == 4  # the current-step clock gives 0 here (9 - 1 > 2)
    report = buf.add(_positives(4, first_group=50, first_episode=500), step=9)
    assert (report.evicted_stale, report.size) == (0, 8)  # newest before the add is step 1
    report = buf.add(_positives(4, first_group=60, first_episode=600), step=10)
    assert (report.evicted_stale, report.size) == (4, 8)  # now step 9 is newest: 9 - 1 > 2
    batch = buf.consume(10)
    assert (batch.evicted_stale, batch.n_sampled) == (0, 4)  # sample_size 4 of the 8 fresh
    assert batch.mean_staleness in {0.0, 0.25, 0.5, 0.75, 1.0}  # each from step 9 or 10


def test_staleness_clock_is_validated() -> None:
    with pytest.raises(ValueError, match="staleness"):
        params(staleness="wall_clock")


def test_add_evicts_stale_before_storing() -> None:
    buf = buffer(0, tolerate_steps=0, recalibration="decay")
    buf.add(_positives(4), step=1)
    report = buf.add(_positives(4, first_group=50, first_episode=500), step=2)
    assert (report.evicted_stale, report.size) == (4, 4)


def test_history_never_exceeds_h_and_drops_oldest() -> None:
    buf = buffer(0, history_size=5)
    for t in range(1, 5):
        # 3 single-episode groups with score t -> 3 means equal to t per step
        report = buf.add(
            [mk(10 * t + g, 100 * t + g, score=float(t), adv=0.0) for g in range(3)], step=t
        )
        assert buf.history_groups <= 5
    # kept: the last 5 of [1,1,1,2,2,2,3,3,3,4,4,4] = [3,3,4,4,4] -> p50 = 4
    assert report.history_evicted == 3 and buf.history_groups == 5
    assert buf.baseline()[0] == 4.0


def test_sliding_consume_keeps_the_rest() -> None:
    buf = buffer(0, consume="sliding", sample_size=3, recalibration="decay")
    buf.add(_positives(8), step=1)
    first = buf.consume(1)
    assert first.n_sampled == 3 and len(buf) == 5
    second = buf.consume(1)
    assert not {s.episode_id for s in first.samples} & {s.episode_id for s in second.samples}
    assert len(buf) == 2


def test_clear_consume_drops_unsampled_but_keeps_history() -> None:
    buf = buffer(0, sample_size=3)
    buf.add(_positives(8), step=1)
    buf.consume(1)
    assert len(buf) == 0 and buf.history_groups == 2
    m = buf.metrics(1)
    assert m["total_consumed"] == 3 and m["total_discarded"] == 5 and m["history_groups"] == 2


def test_empty_buffer_consume_gives_empty_batch() -> None:
    buf = buffer(0)
    assert not buf.ready(0)
    batch = buf.consume(0)
    assert batch.samples == [] and batch.n_sampled == 0
    assert math.isnan(batch.p50) and math.isnan(batch.mean_staleness)
    assert set(batch.stats_metrics()) >= {"p50", "s50", "n_before", "n_sampled", "mean_staleness"}


def test_consume_when_recalibration_drops_everything() -> None:
    buf = buffer(0)
    # stored R = 1 in a group with mean 0.5; another group with mean 10 -> p50 = 5.25 > 1
    data = [mk(0, 0, score=1.0, adv=0.5), mk(0, 1, score=0.0, adv=-0.5)]
    data.append(mk(1, 2, score=10.0, adv=0.0))
    buf.add(data, step=1)
    batch = buf.consume(2)
    assert (batch.n_before, batch.n_after_recalibration, batch.n_sampled) == (1, 0, 0)


def test_bad_input_is_rejected_and_leaves_buffer_unchanged() -> None:
    buf = buffer(0)
    buf.add(_positives(4), step=2)
    before = buf.state_dict()
    with pytest.raises(ValueError, match="older"):
        buf.add(_positives(4, first_group=9, first_episode=90), step=1)
    with pytest.raises(ValueError, match="score"):
        buf.add([mk(5, 50, score=math.nan)], step=3)
    bad = mk(5, 51, score=1.0, adv=1.0)
    bad.loss_mask = bad.loss_mask[:-1]
    with pytest.raises(ValueError, match="loss_mask"):
        buf.add([bad], step=3)
    with pytest.raises(ValueError, match="step"):
        buf.consume(-1)
    after = buf.state_dict()
    assert after["hist_means"].tolist() == before["hist_means"].tolist()
    assert after["scalars"] == before["scalars"]


def test_metrics_records() -> None:
    buf = buffer(0)
    report = buf.add(_worked_step(), step=1)
    assert report.as_metrics() == {
        "add_offered": 8.0,
        "add_stored": 2.0,
        "groups_recorded": 4.0,
        "history_evicted": 0.0,
        "evicted_stale": 0.0,
        "size": 2.0,
        "history_groups": 4.0,
    }
    m = buf.metrics(1)
    assert (m["size"], m["eligible"], m["history_groups"], m["total_added"]) == (2.0, 1.0, 4.0, 2.0)
    assert m["trigger_at"] == 6.0  # trigger_ratio 1.5 x capacity 4: "ready" needs 7 eligible


def test_memory_2048_trajectories_of_4096_tokens_under_200mb() -> None:
    n, length = 2048, 4096
    ids = torch.randint(0, 150_000, (length,))
    mask = torch.ones(length, dtype=torch.bool)
    mask[:512] = False
    lp = torch.randn(length) * mask
    samples = [
        Sample(ids, mask, lp, group_id=i // 8, episode_id=i, score=1.0, advantage=0.5)
        for i in range(n)
    ]
    buf = buffer(0, capacity=2048, sample_size=2048, recalibration="decay")
    buf.add(samples, step=1)
    # int32 ids + bool mask + float32 log-probs = 9 bytes/token: 2048 * 4096 * 9 = 75,497,472 bytes
    assert buf.nbytes() == n * length * 9
    assert buf.nbytes() < 200 * 2**20


# ---------------------------------------------------------------- state round trip


def _roundtrip(buf: ReplayBuffer, p: ReplayParams) -> ReplayBuffer:
    f = io.BytesIO()
    torch.save(buf.state_dict(), f)
    f.seek(0)
    other = ReplayBuffer(p, seed=12345)  # a different seed: the generator state must be restored
    other.load_state_dict(torch.load(f, weights_only=True))
    return other


def _sig(batch: ReplayBatch) -> list[tuple[int, float, int, tuple[int, ...], tuple[float, ...]]]:
    out = []
    for s in batch.samples:
        ids, lps = tuple(s.input_ids.tolist()), tuple(s.behavior_logprobs.tolist())
        out.append((s.episode_id, s.advantage, s.step, ids, lps))
    return out


def test_state_roundtrip_exact_through_torch_save() -> None:
    p = params(consume="sliding", sample_size=3, sampling="prioritized")
    buf = ReplayBuffer(p, seed=7)
    buf.add(_worked_step() + _positives(8, first_group=20, first_episode=200), step=1)
    buf.consume(1)
    restored = _roundtrip(buf, p)
    assert restored.metrics(1) == buf.metrics(1)
    for t in (2, 3):
        assert _sig(restored.consume(t)) == _sig(buf.consume(t))


def test_load_rejects_malformed_state() -> None:
    buf = buffer(0)
    with pytest.raises(ValueError, match="format"):
        buf.load_state_dict({"format": 99})
    state = buf.state_dict()
    del state["generator"]
    with pytest.raises(ValueError, match="generator"):
        buf.load_state_dict(state)


def test_load_rejects_inconsistent_sizes() -> None:
    buf = buffer(0)
    buf.add(_positives(4), step=1)
    state = buf.state_dict()
    state["input_ids"] = state["input_ids"][:-1]
    with pytest.raises(ValueError, match="input_ids"):
        buffer(0).load_state_dict(state)
    state = buf.state_dict()
    state["scalars"]["score"] = state["scalars"]["score"][:-1]
    with pytest.raises(ValueError, match="score"):
        buffer(0).load_state_dict(state)


def test_a_state_saved_before_a_new_sample_field_loads_with_its_default() -> None:
    buf = buffer(0)
    buf.add([replace(s, turn_penalty=0.1) for s in _positives(4)], step=1)
    state = buf.state_dict()
    del state["scalars"]["turn_penalty"]  # as saved before Sample.turn_penalty existed
    restored = buffer(0)
    restored.load_state_dict(state)
    assert [s.turn_penalty for s in restored._items] == [0.0] * 4  # the field's default
    kept = [(s.group_id, s.episode_id, s.score) for s in restored._items]
    assert kept == [(s.group_id, s.episode_id, s.score) for s in buf._items]  # the rest as saved
    del state["scalars"]["group_id"]  # a field without a default is still an error
    with pytest.raises(ValueError, match="group_id"):
        buffer(0).load_state_dict(state)


# ---------------------------------------------------------------- properties (vs a small model)

# one training step: groups of episodes, each (score, filtered)
episode_st = st.tuples(st.integers(-2, 3), st.booleans())
step_st = st.tuples(
    st.lists(st.lists(episode_st, min_size=1, max_size=4), max_size=4), st.booleans()
)
params_st = st.fixed_dictionaries(
    {
        "capacity": st.integers(1, 6),
        "history_size": st.integers(1, 12),
        "tolerate_steps": st.integers(0, 3),
        "trigger_ratio": st.sampled_from([0.5, 1.0, 1.5]),
        "sample_size": st.integers(1, 6),
        "sampling": st.sampled_from(["uniform", "prioritized"]),
        "keep": st.sampled_from(["positive", "non_negative"]),
        "consume": st.sampled_from(["clear", "sliding"]),
        "normalize_by_std": st.booleans(),
    }
)


def _make_step(groups: list[list[tuple[int, bool]]], t: int) -> list[Sample]:
    """GRPO-like advantages: score minus group mean (so ties and zeros are common)."""
    out = []
    for g, eps in enumerate(groups):
        mean = sum(s for s, _ in eps) / len(eps)
        for j, (score, filt) in enumerate(eps):
            gid, eid, f = 100 * t + g, 1000 * t + 10 * g + j, ("x",) if filt else ()
            out.append(mk(gid, eid, score=float(score), adv=score - mean, filtered=f))
    return out


class Model:
    """An independent, plain-Python model of the median-mode buffer."""

    def __init__(self, p: ReplayParams) -> None:
        self.p = p
        self.items: dict[int, tuple[float, int]] = {}  # episode id -> (score, step)
        self.means: list[float] = []
        self.stds: list[float] = []

    def add(self, samples: list[Sample], t: int) -> None:
        for g in dict.fromkeys(s.group_id for s in samples):
            ep = [s.score for s in samples if s.group_id == g]  # one sample per episode here
            self.means.append(float(np.mean(ep)))
            self.stds.append(float(np.std(ep, ddof=1)) if len(ep) > 1 else 0.0)
        h = self.p.history_size
        self.means, self.stds = self.means[-h:], self.stds[-h:]
        self.evict(t)
        self.items.update(
            {s.episode_id: (s.score, t) for s in samples if s.advantage > 0 and not s.filtered_by}
        )

    def evict(self, t: int) -> None:
        self.items = {k: v for k, v in self.items.items() if t - v[1] <= self.p.tolerate_steps}

    def eligible(self, t: int) -> dict[int, float]:
        if not self.means:
            return {}
        p50, s50 = float(np.percentile(self.means, 50)), float(np.percentile(self.stds, 50))
        out = {}
        for k, (r, s) in self.items.items():
            a = (r - p50) / (s50 + self.p.std_eps) if self.p.normalize_by_std else r - p50
            if t - s <= self.p.tolerate_steps and (a > 0 if self.p.keep == "positive" else a >= 0):
                out[k] = a
        return out


def _run(
    p: ReplayParams, steps: list[tuple[list[list[tuple[int, bool]]], bool]], seed: int
) -> list[Any]:
    buf, model, trace = ReplayBuffer(p, seed=seed), Model(p), []
    for t, (groups, try_consume) in enumerate(steps, start=1):
        expected = model.eligible(t)
        assert buf.eligible_count(t) == len(expected)
        assert buf.ready(t) == (len(expected) > p.trigger_ratio * p.capacity)
        if try_consume:
            batch = buf.consume(t)
            assert batch.n_after_recalibration == len(expected)
            assert batch.n_sampled == min(p.sample_size, len(expected)) == len(batch.samples)
            ids = [s.episode_id for s in batch.samples]
            assert len(set(ids)) == len(ids)
            for s in batch.samples:
                assert s.advantage == pytest.approx(expected[s.episode_id])
                assert 0 <= t - s.step <= p.tolerate_steps
            model.evict(t)
            kept = {k: v for k, v in model.items.items() if k not in ids}
            model.items = {} if p.consume == "clear" else kept
            trace.append(_sig(batch))
        samples = _make_step(groups, t)
        buf.add(samples, t)
        model.add(samples, t)
        assert buf.history_groups <= p.history_size
        assert len(buf) == len(model.items)
    return trace


@settings(max_examples=60, deadline=None)
@given(pd=params_st, steps=st.lists(step_st, min_size=1, max_size=8), seed=st.integers(0, 2**31))
def test_buffer_matches_model_and_is_deterministic(
    pd: dict[str, Any], steps: Any, seed: int
) -> None:
    p = params(**pd)
    assert _run(p, steps, seed) == _run(p, steps, seed)


@settings(max_examples=40, deadline=None)
@given(
    pd=params_st,
    steps=st.lists(step_st, min_size=2, max_size=8),
    cut=st.integers(1, 7),
    seed=st.integers(0, 2**31),
)
def test_state_roundtrip_resumes_exactly(
    pd: dict[str, Any], steps: Any, cut: int, seed: int
) -> None:
    p = params(**pd)
    cut = min(cut, len(steps) - 1)
    a = ReplayBuffer(p, seed=seed)
    for t, (groups, _) in enumerate(steps[:cut], start=1):
        a.consume(t)
        a.add(_make_step(groups, t), t)
    b = _roundtrip(a, p)
    for t, (groups, _) in enumerate(steps[cut:], start=cut + 1):
        assert _sig(a.consume(t)) == _sig(b.consume(t))
        samples = _make_step(groups, t)
        ra, rb = a.add(samples, t), b.add([replace(s) for s in samples], t)
        assert ra == rb
    assert a.metrics(len(steps)) == b.metrics(len(steps))


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(0, 40), capacity=st.integers(1, 20), ratio=st.sampled_from([0.5, 1.0, 1.5, 2.0])
)
def test_trigger_property(n: int, capacity: int, ratio: float) -> None:
    buf = buffer(0, capacity=capacity, trigger_ratio=ratio, recalibration="decay")
    buf.add([mk(i, i, score=1.0, adv=1.0) for i in range(n)], step=1)
    assert buf.eligible_count(1) == n
    assert buf.ready(1) == (n > ratio * capacity)


@settings(max_examples=30, deadline=None)
@given(
    n=st.integers(1, 20), k=st.integers(1, 25), value=st.floats(0.1, 5.0), seed=st.integers(0, 1000)
)
def test_equal_priorities_never_crash(n: int, k: int, value: float, seed: int) -> None:
    buf = buffer(seed, sampling="prioritized", sample_size=k, recalibration="decay")
    buf.add([mk(0, i, score=1.0, adv=value) for i in range(n)], step=1)
    batch = buf.consume(1)
    assert batch.n_sampled == min(n, k)
    assert all(s.advantage == pytest.approx(0.1 * value) for s in batch.samples)
