"""Ray Train: FSDP2-sharded teacher/student workers running the LinearARD step.

Every worker builds the teacher and the student (same seed, so the same LoRA init on every rank), shards
both with FSDP2 (``linearard.distributed.shard_teacher_student``) and hands them to
:class:`linearard.train.Trainer`. Batches come from the Ray Data shard of this worker
(``get_dataset_shard("train")``), streamed epoch after epoch with a seeded local shuffle. After each optimizer
step the metrics are averaged over the workers and appended to the MLflow run by rank 0; every
``train.checkpoint_every`` steps and at the end they go to ``ray.train.report`` with a checkpoint
(the Trainer's format: trainable weights, optimizer, scheduler, step, data position; one RNG file per rank,
all merged by Ray into one folder). A restarted worker group
(``FailureConfig(max_failures)``) resumes from ``ray.train.get_checkpoint()``: weights, optimizer, schedule and
step exactly, and the data position by skipping as many batches as were consumed (exact when the stream
replays the same order, as it does for a fixed block order and seed).

On CPU the process group is gloo, so the whole job runs on one laptop.
"""

from __future__ import annotations

import itertools
import os
import tempfile
from collections.abc import Iterator
from typing import Any

import ray.train
from ray.experimental import tqdm_ray
import ray.train.torch
import torch
import torch.distributed as dist
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from linearard.config import RunConfig
from linearard.distributed import shard_teacher_student
from linearard.models import build_teacher_student
from linearard.train import Trainer, seed_everything
from pipelines.tracking import StepLogger

# Test hook: the rank-1 worker (rank 0 with one worker) dies once, right after this optimizer step, in a
# run that did not start from a checkpoint. Set on the driver; passed to the workers in the loop config.
FAIL_ONCE_ENV = "LINEARARD_FAIL_ONCE_AT_STEP"
# Metrics added over workers (the rest are averaged).
_SUMMED = ("tokens", "tokens_per_s")


def make_trainer(
    cfg: RunConfig,
    datasets: dict[str, Any],
    *,
    run_name: str,
    storage_path: str,
    tracking: dict[str, str] | None = None,
) -> TorchTrainer:
    """A ``TorchTrainer`` for ``cfg`` over ``datasets["train"]`` (blocks from ``pipelines.data``).

    ``tracking`` = ``{"uri": ..., "run_id": ...}`` makes rank 0 append per-step metrics to that MLflow run.
    A run with the same ``run_name`` and ``storage_path`` as an earlier one resumes from its last checkpoint.
    """
    loop_config = {"run": cfg.to_dict(), "tracking": tracking, "fail_once_at_step": _fail_once_at_step()}
    return TorchTrainer(
        train_loop,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(
            num_workers=cfg.ray.num_workers,
            use_gpu=cfg.ray.use_gpu,
            resources_per_worker=cfg.ray.resources_per_worker or None,
        ),
        run_config=ray.train.RunConfig(
            name=run_name,
            storage_path=storage_path,
            failure_config=FailureConfig(max_failures=cfg.ray.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
        datasets=datasets,
    )


def train_loop(config: dict[str, Any]) -> None:
    """The per-worker loop (runs inside each Ray Train worker)."""
    cfg = RunConfig.from_dict(config["run"])
    rank = ray.train.get_context().get_world_rank()
    device = ray.train.torch.get_device()
    seed_everything(cfg.train.seed)
    teacher, student, _ = build_teacher_student(cfg.model, cfg.lora, device)
    shard_teacher_student(teacher, student)
    trainer = Trainer(cfg, teacher, student, device=device)

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            trainer.load_checkpoint(directory)
    start_step = trainer.step
    tracking = config.get("tracking")
    log_step = StepLogger(tracking["uri"], tracking["run_id"]) if tracking and rank == 0 else None
    offset = tracking.get("step_offset", 0) if tracking else 0  # a later stage continues the step axis
    if log_step is not None and checkpoint is not None:
        log_step({"resumed_from_step": start_step}, offset + start_step)  # a restart shows in the metrics
    fail_at = config.get("fail_once_at_step")
    fail_rank = min(1, ray.train.get_context().get_world_size() - 1)
    # Ray's tqdm: one bar in the driver's console (rank 0's), not a line per update from every worker
    bar = tqdm_ray.tqdm(total=cfg.train.steps, desc=f"{cfg.train.method} steps", position=0) if rank == 0 else None
    if bar is not None and start_step:
        bar.update(start_step)

    batches = itertools.islice(_batches(cfg, rank), trainer.batches_seen, None)
    while trainer.step < cfg.train.steps:
        metrics = _mean_over_workers(trainer.train_step(next(batches)))
        metrics["step"] = trainer.step
        if bar is not None:
            bar.update(1)
        if log_step is not None and trainer.step % cfg.train.log_every == 0:
            log_step(metrics, offset + trainer.step)
        if fail_at == trainer.step and start_step == 0 and rank == fail_rank:
            # The test hook: once Ray Train has committed the checkpoints reported so far, this worker process
            # dies without a word, as a killed one would.
            ray.train.get_all_reported_checkpoints(consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED)
            os._exit(1)
        # Ray Train only hears of checkpoints: its controller takes one report per health-check poll (2 s), so
        # a report every step would cap training at one step per 2 s. Step metrics go to MLflow directly.
        every = cfg.train.checkpoint_every
        if trainer.step == cfg.train.steps or (every and trainer.step % every == 0):
            with tempfile.TemporaryDirectory() as directory:
                trainer.write_checkpoint(directory)
                ray.train.report(metrics, checkpoint=Checkpoint.from_directory(directory),
                                 checkpoint_dir_name=f"step-{trainer.step:08d}")
    if bar is not None:
        bar.close()


def _batches(cfg: RunConfig, rank: int) -> Iterator[dict[str, torch.Tensor]]:
    """Endless training batches of this worker's shard: ``train.batch_size`` blocks, epoch after epoch."""
    shard = ray.train.get_dataset_shard("train")
    size = cfg.train.batch_size
    for epoch in itertools.count():
        produced = 0
        for batch in shard.iter_torch_batches(
            batch_size=size,
            drop_last=True,  # every worker sees the same number of batches (the shards are equal)
            local_shuffle_buffer_size=max(4 * size, 64),
            local_shuffle_seed=cfg.data.shuffle_seed + 1000 * epoch + rank,
            dtypes=torch.long,
            device="cpu",
        ):
            produced += 1
            # Blocks are full (no padding), so no attention_mask: an all-ones one would only cost transformers a
            # host sync per forward to find it all ones, and the relation op a mask it need not read.
            out = {"input_ids": batch["input_ids"]}
            if "segment_ids" in batch:
                out["segment_ids"] = batch["segment_ids"]
            yield out
        if produced == 0:
            raise ValueError(
                f"the training data gives no full batch of {size} blocks of {cfg.data.ctx_len} tokens per "
                "worker: use more or longer documents, a smaller data.ctx_len or train.batch_size"
            )


def _mean_over_workers(metrics: dict[str, float]) -> dict[str, float]:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return dict(metrics)
    names = sorted(metrics)
    backend_device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    values = torch.tensor([float(metrics[n]) for n in names], dtype=torch.float64, device=backend_device)
    dist.all_reduce(values)
    world = dist.get_world_size()
    return {n: float(v) if n in _SUMMED else float(v) / world for n, v in zip(names, values.tolist())}


def _fail_once_at_step() -> int | None:
    value = os.environ.get(FAIL_ONCE_ENV)
    return int(value) if value else None
