import json
import math

import torch

from spear.metrics import JsonlSink, read_metrics, sync_metrics


def test_sync_metrics_mixes_tensors_and_floats():
    out = sync_metrics({"b": torch.tensor(2.5), "a": 1, "c": torch.tensor([3.0])})
    assert out == {"a": 1.0, "b": 2.5, "c": 3.0} and list(out) == ["a", "b", "c"]


def test_jsonl_writes_null_for_nonfinite_and_truncates_on_resume(tmp_path):
    p = tmp_path / "metrics.jsonl"
    s = JsonlSink(p)
    for step in range(1, 5):
        s.write(step, {"x": float(step), "bad": math.nan})
    s.close()
    assert json.loads(p.read_text().splitlines()[0]) == {"step": 1, "x": 1.0, "bad": None}
    s = JsonlSink(p, truncate_after_step=2)  # resumed from the step-2 checkpoint
    s.write(3, {"x": 30.0})
    s.close()
    assert [(r["step"], r["x"]) for r in read_metrics(p)] == [(1, 1.0), (2, 2.0), (3, 30.0)]
