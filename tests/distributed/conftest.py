"""One local 2-CPU Ray cluster for every ``ray``-marked test (starting one takes ~15 s).

Actors in these tests request fractional CPUs, so they all fit two cores."""

from __future__ import annotations

from collections.abc import Iterator

import pytest


@pytest.fixture(scope="session")
def cluster() -> Iterator[None]:
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()
