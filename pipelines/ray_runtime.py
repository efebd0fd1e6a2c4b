"""Ray start-up, in one place: join the cluster the user named, or start a private local one.

``ray.address`` (or ``RAY_ADDRESS``, which ``ray job submit`` sets for its driver) names a cluster to join;
without either, a private local Ray is started for this job, sized to the machine, and never an
``address="auto"`` join of whatever Ray happens to run on the host.
"""

from __future__ import annotations

import os

import ray

from linearard.config import RayConfig


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
