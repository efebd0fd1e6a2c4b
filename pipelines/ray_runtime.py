"""Ray start-up and Ray errors, in one place: join the cluster the user named, or start a private local one;
what it cannot host (``check_resources`` refuses it for a local Ray, ``warn_if_short`` says it for a cluster);
the error behind Ray's wrappers (``root_cause``) and whether a retry can help (``is_deterministic``).

``ray.address`` (or ``RAY_ADDRESS``, which ``ray job submit`` sets for its driver) names a cluster to join;
without either, a private local Ray is started for this job, sized to the machine, and never an
``address="auto"`` join of whatever Ray happens to run on the host.
"""

from __future__ import annotations

import os
import sys

import ray
import ray.exceptions
import ray.train

from linearard.config import ConfigError, RayConfig


def start(cfg: RayConfig) -> None:
    """Connect this driver to Ray for the job (a no-op when already connected)."""
    if ray.is_initialized():
        return
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, logging_level="WARNING")
        return
    # The dashboard (on 127.0.0.1) also serves the state API that Ray Train's controller polls. Logical CPUs:
    # enough for the workers plus the data and evaluation stages.
    ray.init(address="local", num_cpus=max(os.cpu_count() or 1, cfg.num_workers + 2), include_dashboard=True,
             logging_level="WARNING")


def check_resources(cfg: RayConfig) -> None:
    """Raise ``ConfigError`` when the private local Ray ``start`` would start could never host the workers (Ray
    would wait for them forever): a worker per core at most (each holds a teacher and a student and computes),
    the GPUs they ask for, no custom resources. A cluster's resources are not checked here: an autoscaler may
    add the nodes a request needs."""
    if cfg.address or os.environ.get("RAY_ADDRESS"):
        return
    local = "(a local Ray; give ray.address to run on a cluster)"
    per_worker = cfg.resources_per_worker
    cores, cpus = os.cpu_count() or 1, per_worker.get("CPU", 1.0)
    if cfg.num_workers * cpus > cores:
        raise ConfigError(f"ray.num_workers: {cfg.num_workers} workers x {cpus:g} CPU need "
                          f"{cfg.num_workers * cpus:g} cores and this machine has {cores} {local}")
    if cfg.use_gpu:
        import torch

        have, gpus = torch.cuda.device_count(), per_worker.get("GPU", 1.0)
        if cfg.num_workers * gpus > have:
            raise ConfigError(f"ray.use_gpu: {cfg.num_workers} workers x {gpus:g} GPU need "
                              f"{cfg.num_workers * gpus:g} GPUs and this machine has {have} {local}")
    custom = sorted(set(per_worker) - {"CPU", "GPU", "memory"})
    if custom:
        raise ConfigError(f"ray.resources_per_worker: a local Ray has no {custom[0]!r} resource {local}")


def warn_if_short(cfg: RayConfig) -> None:
    """One line on stderr when the connected cluster, as it stands, cannot host the workers and the data stage
    beside them (Ray Data's file listing takes a whole CPU): the job then waits for nodes an autoscaler may add,
    or for ever on a fixed cluster."""
    have = ray.cluster_resources()
    per_worker = cfg.resources_per_worker
    need = {"CPU": cfg.num_workers * per_worker.get("CPU", 1.0) + 1,
            "GPU": cfg.num_workers * per_worker.get("GPU", 1.0) if cfg.use_gpu else 0.0}
    if any(have.get(name, 0.0) < amount for name, amount in need.items()):
        print(f"linearard: the Ray cluster has {have.get('CPU', 0.0):g} CPU and {have.get('GPU', 0.0):g} GPU; the "
              f"{cfg.num_workers} workers and the data stage need {need['CPU']:g} CPU and {need['GPU']:g} GPU: the "
              "job waits until nodes are added", file=sys.stderr, flush=True)


# Errors that our code (or a library it calls) raises for its inputs: the same inputs raise them again, so a
# retry from the last checkpoint only repeats the failure.
DETERMINISTIC_ERRORS = (ValueError, TypeError, KeyError, IndexError, AttributeError, NameError, ImportError,
                        AssertionError, ArithmeticError, NotImplementedError, FileNotFoundError)


def root_cause(err: BaseException) -> BaseException:
    """The error behind Ray's wrappers: a Ray task's ``RayTaskError`` (its ``cause``), Ray Train's
    ``ControllerError`` (its ``controller_failure``) and ``WorkerGroupError`` (the worker's own error: a
    deterministic one first, the lowest rank's otherwise)."""
    while True:
        if isinstance(err, ray.exceptions.RayTaskError) and isinstance(err.cause, BaseException):
            err = err.cause
        elif isinstance(err, ray.train.ControllerError):
            err = err.controller_failure
        elif isinstance(err, ray.train.WorkerGroupError) and err.worker_failures:
            failures = [err.worker_failures[rank] for rank in sorted(err.worker_failures)]
            err = next((e for e in failures if is_deterministic(e)), failures[0])
        else:
            return err


def is_deterministic(err: BaseException) -> bool:
    """Whether ``err`` (its root cause) would happen again on a retry (``DETERMINISTIC_ERRORS``)."""
    return isinstance(root_cause(err), DETERMINISTIC_ERRORS)
