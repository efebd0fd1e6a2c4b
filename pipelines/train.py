"""Ray Train: FSDP2-sharded teacher/student workers, each driving the library's training loop.

Every worker builds the teacher and the student from the plan (same seed, so the same LoRA init on every
rank), shards both with FSDP2 (``linearard.distributed.shard_teacher_student``) and runs
``linearard.train.Trainer.fit`` with what Ray gives it: batches from its Ray Data shard
(``get_dataset_shard("train")``, epoch after epoch with a seeded local shuffle), Ray Train's checkpoint storage
(``RayCheckpoints``: resume from ``ray.train.get_checkpoint()``, save through ``ray.train.report``), Ray's tqdm
bar, and per-step metrics queued to the MLflow run by rank 0 (``StepLogger``: never on the critical path).

``train_stage`` runs a stage to its end. After a worker failure it restarts the workers (up to
``ray.max_failures`` times): they resume weights, optimizer, schedule, step and RNG exactly, and the data
position by skipping as many batches as were consumed (exact: the stream replays the same order). An error a
retry would repeat (``ray_runtime.is_deterministic``: a bad input, a diverged loss) is raised at once, as itself.
The retries are the driver's, not Ray Train's (``FailureConfig(max_failures=0)``): Ray Train retries every
worker error alike. A checkpoint record Ray Train cannot read (its snapshot file cut short, e.g. by a full
disk) is set aside, and the workers resume from the newest complete checkpoint folder instead.

On CPU the process group is gloo, so the whole job runs on one laptop.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import signal
import sys
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

from linearard import checkpoint
from linearard.checkpoint import step_folder
from linearard.distributed import shard_teacher_student
from linearard.models import build_teacher_student
from linearard.plan import Plan
from linearard.train import Trainer, seed_everything
from pipelines.ray_runtime import is_deterministic, root_cause
from pipelines.tracking import StepLogger

# Test hooks, set on the driver and passed to the workers in the loop config. FAIL_ONCE_ENV: the rank-1
# worker (rank 0 with one worker) dies right after this optimizer step, in a run that did not resume from a
# checkpoint. KILL_DRIVER_ENV: after this step, rank 0 kills the driver (SIGKILL, as a killed job would die).
FAIL_ONCE_ENV = "LINEARARD_FAIL_ONCE_AT_STEP"
KILL_DRIVER_ENV = "LINEARARD_KILL_DRIVER_AT_STEP"
# Ray Train's record of a run's checkpoints, in the run's storage folder.
SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"


def train_stage(plan: Plan, stage: int, dataset: Any, *, init_from: str | None = None,
                run_id: str | None = None) -> ray.train.Result:
    """Train ``plan.stages[stage]`` to its end; arguments as ``make_trainer``'s. Retries worker failures from the
    last checkpoint up to ``ray.max_failures`` times; raises the root cause of a failure that a retry would
    repeat, or of the last one."""
    set_aside_damaged_record(plan, stage)
    max_failures = plan.stages[stage].config.ray.max_failures
    failures = 0
    while True:
        try:
            return make_trainer(plan, stage, dataset, init_from=init_from, run_id=run_id).fit()
        except ray.train.WorkerGroupError as err:
            cause, failures = root_cause(err), failures + 1
            if is_deterministic(cause) or failures > max_failures:
                raise cause from None
            print(f"linearard: a training worker failed ({type(cause).__name__}: {_first_line(cause)}); "
                  f"restarting from the last checkpoint (retry {failures} of {max_failures})",
                  file=sys.stderr, flush=True)


def make_trainer(plan: Plan, stage: int, dataset: Any, *, init_from: str | None = None,
                 run_id: str | None = None) -> TorchTrainer:
    """A ``TorchTrainer`` for ``plan.stages[stage]`` over ``dataset`` (blocks from ``pipelines.data``), that
    does not retry (``train_stage`` does).

    ``init_from`` is a checkpoint folder the student's trainable weights start from (the previous stage's
    last); ``run_id`` makes rank 0 append per-step metrics to that MLflow run. A run with the stage's run name
    and storage path that has checkpoints resumes from its last one.
    """
    cfg = plan.stages[stage].config
    hooks = {name: int(os.environ[env]) if os.environ.get(env) else None
             for name, env in (("fail_once_at_step", FAIL_ONCE_ENV), ("kill_driver_at_step", KILL_DRIVER_ENV))}
    loop_config = {"plan": plan, "stage": stage, "init_from": init_from, "run_id": run_id, **hooks,
                   "driver_pid": os.getpid()}  # the driver-kill hook's target
    return TorchTrainer(
        train_loop,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=cfg.ray.num_workers, use_gpu=cfg.ray.use_gpu,
                                     resources_per_worker=cfg.ray.resources_per_worker or None),
        run_config=ray.train.RunConfig(name=plan.stages[stage].run_name, storage_path=plan.output.storage_path,
                                       failure_config=FailureConfig(max_failures=0),
                                       checkpoint_config=CheckpointConfig(num_to_keep=2),
                                       # Ray Train's console logs would repeat a worker's error as tracebacks
                                       # (the worker's, the controller's): the driver says it once, as its root
                                       # cause. Ray Train's log files in the Ray session keep everything.
                                       logging_config=ray.train.LoggingConfig(log_level="CRITICAL")),
        datasets={"train": dataset},
    )


def local_run_folder(plan: Plan, stage: int) -> Path | None:
    """The stage's Ray Train storage folder when the storage is a local path (None for a URI such as s3://)."""
    storage = plan.output.storage_path
    return None if "://" in storage else Path(storage) / plan.stages[stage].run_name


def set_aside_damaged_record(plan: Plan, stage: int) -> None:
    """Move a checkpoint record Ray Train cannot read (``SNAPSHOT_FILE`` empty or cut short) out of the way:
    Ray Train would fail every run on this output on it. Its checkpoint folders stay; the workers resume from
    the newest complete one (``RayCheckpoints.latest``)."""
    folder = local_run_folder(plan, stage)
    record = folder / SNAPSHOT_FILE if folder is not None else None
    if record is None or not record.is_file():
        return
    try:
        json.loads(record.read_bytes())
    except ValueError:  # empty, cut short, or not UTF-8
        damaged = record.with_name(f"{SNAPSHOT_FILE}.damaged")
        record.replace(damaged)
        print(f"linearard: Ray Train's checkpoint record {record} is damaged (moved to {damaged.name}); resuming "
              "from the newest complete checkpoint folder", file=sys.stderr, flush=True)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else ""


class RayCheckpoints:
    """Ray Train's checkpoint storage as the training loop's ``CheckpointStore``.

    Resumes from Ray Train's latest checkpoint, or, when Ray Train has none on record (its record was damaged
    and set aside), from the newest complete checkpoint folder in ``fallback_folder``. Ray Train only hears of
    checkpoints: its controller takes one report per health-check poll (2 s), so a report every step would cap
    training at one step per 2 s. Step metrics go to MLflow directly.
    """

    def __init__(self, fallback_folder: Path | None = None) -> None:
        self.fallback_folder = fallback_folder

    def latest(self) -> contextlib.AbstractContextManager[Path | None]:
        found = ray.train.get_checkpoint()
        if found is not None:
            return _as_path(found)
        folder = checkpoint.latest(self.fallback_folder) if self.fallback_folder is not None else None
        return contextlib.nullcontext(folder)

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

    log = StepLogger(plan.config.tracking.uri, config["run_id"]) if config["run_id"] and rank == 0 else None
    fail_rank = min(1, world - 1)
    first_step: int | None = None  # of this attempt: > 1 when it resumed from a checkpoint

    def on_step(step: int, metrics: dict[str, float]) -> None:
        nonlocal first_step
        if first_step is None:
            first_step = step
            if log is not None and step > 1:  # a restart shows in the metrics
                log.mark_resume(stage.first_step + step - 1)
        if log is not None and step % cfg.train.log_every == 0:
            log({**metrics, "step": stage.first_step + step}, stage.first_step + step)
        # The test hooks act once Ray Train has committed the checkpoints reported so far, without a word, as
        # a killed process would.
        if step == config["fail_once_at_step"] and first_step == 1 and rank == fail_rank:
            _committed_checkpoints()
            os._exit(1)
        if step == config["kill_driver_at_step"] and rank == 0:
            _committed_checkpoints()
            if log is not None:
                log.close()
            os.kill(config["driver_pid"], signal.SIGKILL)
            os._exit(1)

    def make_bar(total: int, initial: int) -> Any:
        if rank != 0 or not cfg.train.progress_bar:
            return _NoBar()
        # Ray's tqdm: one bar in the driver's console (rank 0's), not a line per update from every worker
        bar = tqdm_ray.tqdm(total=total, desc=f"{stage.method} steps", position=0)
        bar.update(initial)
        return bar

    try:
        trainer.fit(_batches(cfg, rank), RayCheckpoints(local_run_folder(plan, config["stage"])), on_step=on_step,
                    make_bar=make_bar)
    finally:
        if log is not None:
            log.close()


def _committed_checkpoints() -> None:
    ray.train.get_all_reported_checkpoints(consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED)


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
