"""The warm models that ship inside the package, and the script that builds them.

The default run's warm model (tokenizer and weights, about 3 MB) lives in
``spear/data/warm/warm-<cache key>/``, exactly what :func:`~spear.models.warmstart.ensure_warm_model`
would have built into the cache: :func:`~spear.models.warmstart.find_warm_model` takes it before
the cache, so a first ``spear train`` skips the five-minute build and every machine starts from
the same weights (a build is deterministic on one machine, but float rounding differs between
CPUs and thread counts). Any other model or warm-start setting has another key and builds and
caches as before.

Rebuild after a change to the defaults or to the warm-start code (it takes about 5 minutes on 2
cores; the old directory is replaced)::

    python -m spear.models.shipped                # build every shipped model
    python -m spear.models.shipped --only lookup  # build one, keep the others
    python -m spear.models.shipped --check        # only compare the shipped fingerprints

Each shipped directory carries a :func:`build_fingerprint` of its build inputs (the
demonstrations, the tokenizer, a sample of encoded demonstrations and the initial weights): cheap
to recompute, so a test checks that the shipped model is still what the defaults would build
(the training steps themselves are compared by an opt-in ``slow`` test that rebuilds).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import math
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from spear.models.tiny import build_tiny_model
from spear.models.tokenizer import train_tokenizer
from spear.models.warmstart import (
    DEMO_SOURCES,
    SHIPPED_DIR,
    WarmStartParams,
    build_warm_model,
    encode_with_mask,
)

log = logging.getLogger(__name__)

#: shipped run configs (``spear/configs/<name>.yaml``) whose warm model ships in the package
SHIPPED_RUN_CONFIGS: tuple[str, ...] = ("default", "lookup", "lookup-sparse")
FINGERPRINT_FILE = "fingerprint.json"
ENCODED_SAMPLE = 64  # demonstrations encoded into the fingerprint (all 3,000 take ~10 s)
INIT_REL_TOL = 1e-5  # initial-weight statistics may differ by rounding between CPUs


def shipped_params(name: str) -> tuple[WarmStartParams, int]:
    """The warm-start parameters and seed of the shipped run config ``name``."""
    from spear.config import load_config, run_config_path

    cfg = load_config(file=run_config_path(name))
    return WarmStartParams.from_config(cfg), cfg.model.warm_start.seed


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def build_fingerprint(params: WarmStartParams, seed: int) -> dict[str, Any]:
    """What fixes a build before its first training step, in a few seconds.

    sha256 digests of the demonstrations (as JSON), of the trained tokenizer (its serialisation
    and chat template) and of the first :data:`ENCODED_SAMPLE` encoded demonstrations (ids and
    loss masks), plus each initial weight tensor's sum and sum of squares (float64; compared with
    a tolerance, see :func:`fingerprint_differences`).
    """
    demos, _ = DEMO_SOURCES.get(params.source)().make_demos(params, seed)
    demo_json = json.dumps([[c.messages, c.tools] for c in demos], sort_keys=True)
    tok = train_tokenizer(demos, params.tokenizer)
    tok_text = tok.backend_tokenizer.to_str() + str(tok.chat_template)
    encoded = hashlib.sha256()
    for ids, mask in (encode_with_mask(tok, c) for c in demos[:ENCODED_SAMPLE]):
        encoded.update(ids.numpy().tobytes() + mask.numpy().tobytes())
    model = build_tiny_model(params.model, tok, seed)
    init = {
        name: [float(p.double().sum()), float(p.double().square().sum())]
        for name, p in model.state_dict().items()
    }
    return {
        "demos_sha256": _sha(demo_json.encode()),
        "tokenizer_sha256": _sha(tok_text.encode()),
        "encoded_sample_sha256": encoded.hexdigest(),
        "init_weight_stats": init,
    }


def fingerprint_differences(shipped: dict[str, Any], rebuilt: dict[str, Any]) -> list[str]:
    """What differs between two fingerprints (empty: the same build inputs). Digests must be
    equal; initial-weight statistics equal within :data:`INIT_REL_TOL` (relative)."""
    out = [
        f"{key} differs"
        for key in ("demos_sha256", "tokenizer_sha256", "encoded_sample_sha256")
        if shipped.get(key) != rebuilt.get(key)
    ]
    a, b = shipped.get("init_weight_stats", {}), rebuilt.get("init_weight_stats", {})
    if sorted(a) != sorted(b):
        return [*out, "initial weights have different tensors"]
    for name in sorted(a):
        for x, y in zip(a[name], b[name]):
            if not math.isclose(x, y, rel_tol=INIT_REL_TOL, abs_tol=INIT_REL_TOL):
                out.append(f"initial weights of {name} differ ({x:.6g} vs {y:.6g})")
                break
    return out


def weight_distance(dir_a: Path, dir_b: Path) -> float:
    """max over weight tensors of ``||a - b|| / ||b||`` between two saved warm models."""
    from safetensors.torch import load_file

    a, b = load_file(dir_a / "model.safetensors"), load_file(dir_b / "model.safetensors")
    if sorted(a) != sorted(b):
        raise ValueError(f"{dir_a} and {dir_b} hold different tensors")
    return max(
        float((a[k].double() - b[k].double()).norm() / b[k].double().norm().clamp(min=1e-12))
        for k in a
    )


def build_shipped(name: str, root: Path = SHIPPED_DIR) -> Path:
    """Build the warm model of run config ``name`` with its fingerprint into
    ``root/warm-<key>`` (replacing an older build of the same key); return the directory."""
    params, seed = shipped_params(name)
    final = root / f"warm-{params.cache_key(seed)}"
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".building-", dir=root))
    try:
        log.info("building the warm model of %s into %s", name, final)
        build_warm_model(tmp, params, seed)
        fingerprint = build_fingerprint(params, seed)
        (tmp / FINGERPRINT_FILE).write_text(json.dumps(fingerprint, indent=1))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def stale_dirs(root: Path = SHIPPED_DIR) -> list[Path]:
    """Shipped directories that no shipped run config's current key names (left by a rebuild
    after the defaults changed)."""
    keys = {f"warm-{p.cache_key(s)}" for p, s in map(shipped_params, SHIPPED_RUN_CONFIGS)}
    return sorted(d for d in root.glob("warm-*") if d.name not in keys)


def check_shipped(root: Path = SHIPPED_DIR) -> list[str]:
    """Problems with the shipped models (empty: each is what its run config would build)."""
    problems = [f"{d.name} belongs to no shipped run config" for d in stale_dirs(root)]
    for name in SHIPPED_RUN_CONFIGS:
        params, seed = shipped_params(name)
        d = root / f"warm-{params.cache_key(seed)}"
        if not (d / FINGERPRINT_FILE).exists():
            problems.append(f"{name}: no shipped warm model {d.name} (run the build)")
            continue
        report = json.loads((d / "warmstart.json").read_text())
        if report["params"] != json.loads(json.dumps(dataclasses.asdict(params))):
            problems.append(f"{name}: the shipped report's params differ from the defaults")
        shipped = json.loads((d / FINGERPRINT_FILE).read_text())
        diffs = fingerprint_differences(shipped, build_fingerprint(params, seed))
        problems += [f"{name}: {x}" for x in diffs]
    return problems


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m spear.models.shipped", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--check", action="store_true", help="only compare the shipped fingerprints")
    p.add_argument("--only", nargs="+", choices=SHIPPED_RUN_CONFIGS, metavar="NAME",
                   help=f"build only these ({', '.join(SHIPPED_RUN_CONFIGS)}); the others are "
                        "kept as shipped")  # fmt: skip
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not args.check:
        for name in args.only or SHIPPED_RUN_CONFIGS:
            log.info("wrote %s", build_shipped(name))
        for d in stale_dirs():
            log.info("removing the stale %s", d)
            shutil.rmtree(d)
    problems = check_shipped()
    for line in problems:
        log.error("%s", line)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
