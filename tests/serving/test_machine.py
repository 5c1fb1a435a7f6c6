"""The CPU count every default takes its parallelism from."""

from __future__ import annotations

from unittest import mock

import pytest

from recsys_serving.machine import usable_cores
from recsys_serving.training_params import TrainingParams


@pytest.mark.skipif(not hasattr(__import__("os"), "sched_getaffinity"), reason="Linux affinity")
def test_the_cpus_this_process_may_use_not_the_hosts() -> None:
    """A container's cpuset (or ``taskset``) is what counts: 3 of a 64-CPU host."""
    with (
        mock.patch("os.sched_getaffinity", return_value={0, 5, 9}),
        mock.patch("os.cpu_count", return_value=64),
    ):
        assert usable_cores() == 3
        assert TrainingParams(threads=0).resolved_threads == 3
        assert TrainingParams(threads=8).resolved_threads == 8
