"""What a private local Ray could never host is refused before Ray starts (instead of waiting forever)."""

from __future__ import annotations

import os

import pytest
import torch

from linearard.config import ConfigError, RayConfig
from pipelines.ray_runtime import check_resources

CORES = os.cpu_count() or 1


@pytest.mark.parametrize("cfg, words", [
    (RayConfig(num_workers=1000), f"ray.num_workers: 1000 workers x 1 CPU need 1000 cores and this machine has {CORES}"),
    (RayConfig(num_workers=CORES + 1), f"need {CORES + 1} cores"),
    (RayConfig(num_workers=1, resources_per_worker={"CPU": CORES + 1.0}), f"1 workers x {CORES + 1} CPU"),
    (RayConfig(num_workers=1, resources_per_worker={"accelerator_type:H100": 1.0}),
     "ray.resources_per_worker: a local Ray has no 'accelerator_type:H100' resource"),
    pytest.param(RayConfig(use_gpu=True), "ray.use_gpu: 1 workers x 1 GPU need 1 GPUs and this machine has 0",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")),
])
def test_a_local_ray_that_can_never_host_the_workers_is_refused(monkeypatch, cfg, words):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)  # a private local Ray: no cluster named
    with pytest.raises(ConfigError) as err:
        check_resources(cfg)
    assert words in str(err.value) and "give ray.address" in str(err.value), err.value


def test_what_fits_or_goes_to_a_cluster_passes(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    check_resources(RayConfig(num_workers=CORES))
    check_resources(RayConfig(num_workers=1, resources_per_worker={"CPU": 1.0, "memory": 2e9}))
    # A cluster's resources are the cluster's (an autoscaler may add nodes): not checked here.
    check_resources(RayConfig(address="ray://head:10001", num_workers=1000, use_gpu=True))
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    check_resources(RayConfig(num_workers=1000))


def test_a_cluster_too_small_for_the_run_is_said_in_one_line(ray_driver, capsys):
    import ray

    from pipelines.ray_runtime import warn_if_short

    cpus = ray.cluster_resources()["CPU"]
    warn_if_short(RayConfig(num_workers=1))
    assert capsys.readouterr().err == ""
    # The workers take every CPU: Ray Data's file listing needs one more.
    warn_if_short(RayConfig(num_workers=1, resources_per_worker={"CPU": cpus}))
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"has {cpus:g} CPU" in err and f"need {cpus + 1:g} CPU" in err, err
    if not torch.cuda.is_available():
        warn_if_short(RayConfig(num_workers=1, use_gpu=True))
        assert "need 2 CPU and 1 GPU" in capsys.readouterr().err
