"""Ray Train: FSDP2-sharded teacher/student workers, each driving the library's training loop.

Every worker builds the teacher and the student from the plan (same seed, so the same LoRA init on every
rank), shards both with FSDP2 (``linearard.distributed.shard_teacher_student``) and runs
``linearard.train.Trainer.fit`` with what Ray gives it: batches from its Ray Data shard
(``get_dataset_shard("train")``, epoch after epoch with a seeded local shuffle), Ray Train's checkpoint storage
(``RayCheckpoints``: resume from ``ray.train.get_checkpoint()``, save through ``ray.train.report``), Ray's tqdm
bar, and per-step metrics appended to the MLflow run by rank 0. A restarted worker group
(``FailureConfig(max_failures)``) resumes weights, optimizer, schedule, step and RNG exactly, and the data
position by skipping as many batches as were consumed (exact: the stream replays the same order).

On CPU the process group is gloo, so the whole job runs on one laptop.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import ray.train
import ray.train.torch
import torch
from ray.experimental import tqdm_ray
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from linearard.checkpoint import step_folder
from linearard.distributed import shard_teacher_student
from linearard.models import build_teacher_student
from linearard.plan import Plan
from linearard.train import Trainer, seed_everything
from pipelines.tracking import StepLogger

# Test hook: the rank-1 worker (rank 0 with one worker) dies once, right after this optimizer step, in a
# run that did not start from a checkpoint. Set on the driver; passed to the workers in the loop config.
FAIL_ONCE_ENV = "LINEARARD_FAIL_ONCE_AT_STEP"


def make_trainer(plan: Plan, stage: int, dataset: Any, *, init_from: str | None = None,
                 run_id: str | None = None) -> TorchTrainer:
    """A ``TorchTrainer`` for ``plan.stages[stage]`` over ``dataset`` (blocks from ``pipelines.data``).

    ``init_from`` is a checkpoint folder the student's trainable weights start from (the previous stage's
    last); ``run_id`` makes rank 0 append per-step metrics to that MLflow run. A run with the stage's run name
    and storage path that has checkpoints resumes from its last one.
    """
    cfg = plan.stages[stage].config
    fail_at = os.environ.get(FAIL_ONCE_ENV)
    loop_config = {"plan": plan, "stage": stage, "init_from": init_from, "run_id": run_id,
                   "fail_once_at_step": int(fail_at) if fail_at else None}
    return TorchTrainer(
        train_loop,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=cfg.ray.num_workers, use_gpu=cfg.ray.use_gpu,
                                     resources_per_worker=cfg.ray.resources_per_worker or None),
        run_config=ray.train.RunConfig(name=plan.stages[stage].run_name, storage_path=plan.output.storage_path,
                                       failure_config=FailureConfig(max_failures=cfg.ray.max_failures),
                                       checkpoint_config=CheckpointConfig(num_to_keep=2)),
        datasets={"train": dataset},
    )


class RayCheckpoints:
    """Ray Train's checkpoint storage as the training loop's ``CheckpointStore``.

    Ray Train only hears of checkpoints: its controller takes one report per health-check poll (2 s), so a
    report every step would cap training at one step per 2 s. Step metrics go to MLflow directly.
    """

    def latest(self) -> contextlib.AbstractContextManager[Path | None]:
        found = ray.train.get_checkpoint()
        if found is None:
            return contextlib.nullcontext(None)
        return _as_path(found)

    def save(self, step: int, write: Callable[[Path], None], metrics: dict[str, float]) -> None:
        with tempfile.TemporaryDirectory() as directory:
            write(Path(directory))  # this rank's part; Ray merges every rank's folder into one checkpoint
            ray.train.report({**metrics, "step": step}, checkpoint=Checkpoint.from_directory(directory),
                             checkpoint_dir_name=step_folder(step))


@contextlib.contextmanager
def _as_path(found: Checkpoint) -> Iterator[Path]:
    with found.as_directory() as directory:
        yield Path(directory)


def train_loop(config: dict[str, Any]) -> None:
    """The per-worker loop (runs inside each Ray Train worker)."""
    plan: Plan = config["plan"]
    stage = plan.stages[config["stage"]]
    cfg = stage.config
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    seed_everything(cfg.train.seed)
    teacher, student, _ = build_teacher_student(plan.models, cfg.lora, device)
    shard_teacher_student(teacher, student)
    trainer = Trainer(cfg, teacher, student, device=device, init_from=config["init_from"])
    resumed = ray.train.get_checkpoint() is not None

    log = StepLogger(plan.config.tracking.uri, config["run_id"]) if config["run_id"] and rank == 0 else None
    fail_at, fail_rank = config["fail_once_at_step"], min(1, world - 1)

    restart_unlogged = resumed

    def on_step(step: int, metrics: dict[str, float]) -> None:
        nonlocal restart_unlogged
        if log is not None:
            if restart_unlogged:  # a restart shows in the metrics
                log({"resumed_from_step": step - 1}, stage.first_step + step - 1)
                restart_unlogged = False
            if step % cfg.train.log_every == 0:
                log({**metrics, "step": stage.first_step + step}, stage.first_step + step)
        if fail_at == step and not resumed and rank == fail_rank:
            # The test hook: once Ray Train has committed the checkpoints reported so far, this worker process
            # dies without a word, as a killed one would.
            ray.train.get_all_reported_checkpoints(consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED)
            os._exit(1)

    def make_bar(total: int, initial: int) -> Any:
        if rank != 0 or not cfg.train.progress_bar:
            return _NoBar()
        # Ray's tqdm: one bar in the driver's console (rank 0's), not a line per update from every worker
        bar = tqdm_ray.tqdm(total=total, desc=f"{stage.method} steps", position=0)
        bar.update(initial)
        return bar

    trainer.fit(_batches(cfg, rank), RayCheckpoints(), on_step=on_step, make_bar=make_bar)


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def _batches(cfg: Any, rank: int) -> Iterator[dict[str, torch.Tensor]]:
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
