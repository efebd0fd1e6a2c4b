"""The plain-process Trainer: the loss falls, schedule, accumulation, and exact resume from a checkpoint."""

from __future__ import annotations

import math

import pytest
import torch

from safetensors.torch import load_file

from linearard.config import RunConfig
from linearard.distributed import shard_teacher_student
from linearard.models import build_teacher_student
from linearard.train import Trainer, latest_checkpoint, seed_everything


def _cfg(path, out, **train):
    return RunConfig.from_dict({
        "model": {"teacher": str(path), "rope": "linear:4"},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.1},  # dropout: resume must restore the RNG too
        "optim": {"lr": 1e-2, "warmup_steps": 2, "min_lr_ratio": 0.1},
        "data": {"ctx_len": 16},
        "train": {"steps": 6, "batch_size": 4, "progress_bar": False, "output_dir": str(out), **train},
    })


def _setup(cfg, callback=None):
    seed_everything(cfg.train.seed)
    teacher, student, _ = build_teacher_student(cfg.model, cfg.lora)
    return Trainer(cfg, teacher, student, callback=callback)


def _batches(n, seed=0, bsz=4):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, 64, (bsz, 16), generator=g)} for _ in range(n)]


def test_loss_falls_and_schedule(tiny_model, tmp_path):
    cfg = _cfg(tiny_model("mistral"), tmp_path, steps=10, checkpoint_every=0)
    seen = {}
    trainer = _setup(cfg, callback=lambda step, m: seen.__setitem__(step, m))
    batch = _batches(1)[0]
    trainer.fit([batch] * 10)
    losses = [seen[s]["loss"] for s in range(1, 11)]
    assert losses[0] == losses[1]  # warmup's first step has lr 0
    assert all(b < a for a, b in zip(losses[1:], losses[2:])) and losses[-1] < 0.85 * losses[1], losses
    lrs = [seen[s]["lr"] for s in range(1, 11)]
    assert lrs[:3] == pytest.approx([0.0, 5e-3, 1e-2]) and lrs[-1] == pytest.approx(1e-3 + 9e-3 * (1 + math.cos(
        math.pi * 7 / 8)) / 2)
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(1e-3)  # min_lr_ratio × lr at the end
    for key in ("ard_q", "ard_k", "ard_v", "grad_norm", "tokens_per_s"):
        assert math.isfinite(seen[10][key])
    assert seen[10]["tokens"] == 10 * 4 * 16
    assert all(not p.requires_grad for p in trainer.teacher.parameters())
    assert latest_checkpoint(tmp_path / "checkpoints").name == "step-00000010"


def test_grad_accum_matches_one_big_batch(tiny_model, tmp_path):
    path, batch = tiny_model("llama"), _batches(1)[0]
    params = []
    for accum in (1, 2):
        cfg = _cfg(path, tmp_path / str(accum), grad_accum=accum)
        cfg.lora.dropout = 0.0
        trainer = _setup(cfg)
        trainer.optimizer.param_groups[0]["lr"] = 1e-2  # skip warmup's zero first step
        metrics = trainer.train_step(batch)
        params.append(([p.detach().clone() for p in trainer.params], metrics["loss"]))
    torch.testing.assert_close(params[0][1], params[1][1], rtol=1e-5, atol=0)
    for a, b in zip(params[0][0], params[1][0]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_compiled_layers_match_eager(tiny_model, tmp_path):
    path, batches = tiny_model("llama"), _batches(2)
    runs = []
    for compile_ in (False, True):
        cfg = _cfg(path, tmp_path / str(compile_), compile=compile_)
        cfg.lora.dropout = 0.0
        trainer = _setup(cfg)
        trainer.optimizer.param_groups[0]["lr"] = 1e-2  # skip warmup's zero first step
        losses = [trainer.train_step(batch)["loss"] for batch in batches]
        runs.append((losses, [p.detach().clone() for p in trainer.params], trainer))
    compiled = [m for m in runs[1][2].student.modules() if getattr(m, "_compiled_call_impl", None) is not None]
    layers = runs[1][2].student.config.num_hidden_layers
    assert len(compiled) == 3 * layers  # per layer: the MLP and both norms, not the attention
    assert not any(hasattr(m, "q_proj") for m in compiled)
    assert runs[0][0] == pytest.approx(runs[1][0], rel=1e-5)
    for eager, fused in zip(runs[0][1], runs[1][1]):
        torch.testing.assert_close(fused, eager, rtol=1e-4, atol=1e-6)


def test_exact_resume(tiny_model, tmp_path):
    path, batches = tiny_model("qwen3"), _batches(6)
    full = {}
    _setup(_cfg(path, tmp_path / "full", checkpoint_every=0), lambda s, m: full.__setitem__(s, m)).fit(batches)

    resumed = {}
    cfg = _cfg(path, tmp_path / "cut", checkpoint_every=3)
    first = _setup(cfg, lambda s, m: resumed.__setitem__(s, m))
    for batch in batches[:3]:
        first.train_step(batch)
    checkpoint = first.save_checkpoint(tmp_path / "cut" / "checkpoints")
    assert {p.name for p in checkpoint.iterdir()} >= {"trainable.safetensors", "optimizer.pt", "trainer.pt", "rng-0.pt"}
    torch.manual_seed(1234)  # disturb every RNG and start from a fresh process state
    second = _setup(cfg, lambda s, m: resumed.__setitem__(s, m))
    second.load_checkpoint(latest_checkpoint(tmp_path / "cut" / "checkpoints"))
    assert second.step == 3 and second.batches_seen == 3
    second.fit(batches)  # skips the 3 consumed batches
    for step in range(1, 7):
        for key in ("loss", "ard_q", "ard_k", "ard_v", "lr", "grad_norm"):
            assert resumed[step][key] == full[step][key], (step, key)


def _fsdp_worker(rank, path, out, port, compiled):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    cfg = _cfg(path, out, steps=3, batch_size=2, grad_accum=2, checkpoint_every=0, compile=compiled)
    cfg.lora.dropout, cfg.optim.warmup_steps, cfg.model.gradient_checkpointing = 0.0, 0, True
    seed_everything(0)
    teacher, student, _ = build_teacher_student(cfg.model, cfg.lora)
    shard_teacher_student(teacher, student)  # as the Ray Train worker does
    trainer = Trainer(cfg, teacher, student)
    losses = [trainer.train_step({"input_ids": b["input_ids"][2 * rank:2 * rank + 2]})["loss"] for b in _batches(3)]
    trainer.save_checkpoint(out / "checkpoints")  # collective: gathers full state on every rank
    torch.save(losses, out / f"losses-{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.parametrize("compiled", [False, True])
def test_fsdp2_two_ranks_match_one_process(tiny_model, tmp_path, compiled):
    """FSDP2-sharded teacher/student (gloo, CPU) + gradient checkpointing + accumulation, with or without the
    compiled norms and MLPs: each rank's half batch gives the same training as one eager process on the whole
    batch."""
    import socket

    path = tiny_model("llama")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_fsdp_worker, args=(path, tmp_path, port, compiled), nprocs=2)
    sharded = [sum(pair) / 2 for pair in zip(*(torch.load(tmp_path / f"losses-{r}.pt") for r in range(2)))]

    cfg = _cfg(path, tmp_path / "single", steps=3, grad_accum=2, checkpoint_every=0)
    cfg.lora.dropout, cfg.optim.warmup_steps = 0.0, 0
    trainer = _setup(cfg)
    single = [trainer.train_step(b)["loss"] for b in _batches(3)]
    assert sharded == pytest.approx(single, rel=1e-4)
    saved = load_file(latest_checkpoint(tmp_path / "checkpoints") / "trainable.safetensors")
    for name, value in trainer.student.state_dict().items():
        if name in saved:
            torch.testing.assert_close(saved[name], value, rtol=1e-3, atol=1e-5)
