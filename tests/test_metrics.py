import json
import math
import struct
import time
from pathlib import Path

import pytest
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


# ----------------------------------------------------------------------------------------------
# TensorBoard and Weights & Biases sinks


def test_tensorboard_sink_writes_every_scalar_at_its_step(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from spear.metrics import MetricLogger

    logger = MetricLogger.create(
        tmp_path, tensorboard=True, wandb=False, wandb_project="p", config={}, resume_step=None
    )
    logger.write(1, {"actor/entropy": 0.5, "train/success": 0.25})
    logger.write(2, {"actor/entropy": 0.75})
    logger.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert set(events.Tags()["scalars"]) == {"actor/entropy", "train/success"}
    got = [(e.step, e.value) for e in events.Scalars("actor/entropy")]
    assert got == [(1, 0.5), (2, 0.75)]
    assert [(e.step, e.value) for e in events.Scalars("train/success")] == [(1, 0.25)]
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2]


def _wandb_records(path: Path) -> list:
    """The protobuf records of a ``.wandb`` transaction log: a 7-byte file header, then
    LevelDB-log framing (32 KiB blocks; each chunk: crc32, length, type; FULL=1 / FIRST=2 /
    MIDDLE=3 / LAST=4)."""
    from wandb.proto import wandb_internal_pb2

    data, pos, block, part, out = path.read_bytes(), 7, 32768, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        part += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(part)
            out.append(record)
            part = b""
    return out


def test_wandb_sink_logs_offline(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    for var, value in [("WANDB_MODE", "offline"), ("WANDB_SILENT", "true"),
                       ("WANDB_CONFIG_DIR", str(tmp_path / "cfg")),
                       ("WANDB_CACHE_DIR", str(tmp_path / "cache"))]:  # fmt: skip
        monkeypatch.setenv(var, value)
    from spear.metrics import WandbSink

    sink = WandbSink("spear-test", tmp_path, {"loss": {"kl_coef": 0.1}})
    sink.write(1, {"actor/entropy": 0.5, "train/success": 0.25})
    sink.write(2, {"actor/entropy": 0.75})
    sink.close()
    (log,) = tmp_path.glob("wandb/offline-run-*/run-*.wandb")
    deadline = time.monotonic() + 60  # wandb's service writes the log after finish() returns
    while not any(r.WhichOneof("record_type") == "exit" for r in _wandb_records(log)):
        assert time.monotonic() < deadline, "the offline run never wrote its exit record"
        time.sleep(0.2)
    records = _wandb_records(log)
    rows = [  # keys with "/" come as nested keys; wandb adds _timestamp and _runtime
        {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
        for r in records
        if r.WhichOneof("record_type") == "history"
    ]
    rows = [{k: v for k, v in row.items() if k not in ("_timestamp", "_runtime")} for row in rows]
    assert rows == [
        {"_step": 1, "actor/entropy": 0.5, "train/success": 0.25},
        {"_step": 2, "actor/entropy": 0.75},
    ]
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert run.project == "spear-test"
    config = {i.key: json.loads(i.value_json) for i in run.config.update}
    assert config["loss"] == {"kl_coef": 0.1}


def test_wandb_missing_is_one_clear_error(tmp_path, monkeypatch):
    import sys

    from spear.metrics import WandbSink

    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    with pytest.raises(RuntimeError, match=r"pip install 'spear\[wandb\]'"):
        WandbSink("p", tmp_path, {})
