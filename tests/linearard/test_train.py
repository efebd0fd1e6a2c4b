"""The training loop: the loss falls, schedule, accumulation, compiled layers, FSDP2, and exact resume from a
checkpoint (the loop every run trains with: the Ray worker drives this same ``Trainer.fit``)."""

from __future__ import annotations

import math

import pytest
import torch

from safetensors.torch import load_file

from linearard import checkpoint
from linearard.checkpoint import LocalCheckpoints
from linearard.distributed import shard_teacher_student
from linearard.models import build_teacher_student
from linearard.train import NonFiniteError, Trainer, seed_everything
from tests.conftest import plan_for


def _plan(path, out, lora_dropout=0.1, gradient_checkpointing=False, warmup_steps=2, lr=1e-2, **train):
    return plan_for(path, model={"rope": "linear:4", "gradient_checkpointing": gradient_checkpointing},
                    lora={"r": 4, "alpha": 8, "dropout": lora_dropout},  # dropout: resume must restore the RNG too
                    optim={"lr": lr, "warmup_steps": warmup_steps, "min_lr_ratio": 0.1},
                    train={"method": "ard", "steps": 6, "batch_size": 4, "progress_bar": False, "output_dir": str(out),
                           **train})


def _setup(plan):
    cfg = plan.stages[0].config
    seed_everything(cfg.train.seed)
    teacher, student, _ = build_teacher_student(plan.models, cfg.lora)
    return Trainer(cfg, teacher, student)


def _batches(n, seed=0, bsz=4):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, 64, (bsz, 16), generator=g)} for _ in range(n)]


def test_loss_falls_and_schedule(tiny_model, tmp_path):
    plan = _plan(tiny_model("mistral"), tmp_path, steps=10, checkpoint_every=0)
    seen = {}
    trainer = _setup(plan)
    batch = _batches(1)[0]
    trainer.fit([batch] * 10, LocalCheckpoints(tmp_path / "checkpoints"), on_step=seen.__setitem__)
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
    assert checkpoint.latest(tmp_path / "checkpoints").name == "step-00000010"


def test_a_diverging_run_stops_at_its_step_and_saves_nothing(tiny_model, tmp_path):
    plan = _plan(tiny_model("llama"), tmp_path, warmup_steps=0, lr=1e30, checkpoint_every=1)
    seen = {}
    with pytest.raises(NonFiniteError, match="training diverged at step 2: loss"):
        _setup(plan).fit(_batches(6), LocalCheckpoints(tmp_path / "checkpoints"), on_step=seen.__setitem__)
    assert list(seen) == [1] and math.isfinite(seen[1]["loss"])  # the diverged step reaches no callback
    assert checkpoint.latest(tmp_path / "checkpoints").name == "step-00000001"  # and no checkpoint


def test_grad_accum_matches_one_big_batch(tiny_model, tmp_path):
    path, batch = tiny_model("llama"), _batches(1)[0]
    params = []
    for accum in (1, 2):
        trainer = _setup(_plan(path, tmp_path / str(accum), lora_dropout=0.0, grad_accum=accum))
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
        trainer = _setup(_plan(path, tmp_path / str(compile_), lora_dropout=0.0, compile=compile_))
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
    plan = _plan(path, tmp_path / "full", checkpoint_every=0)
    _setup(plan).fit(batches, LocalCheckpoints(tmp_path / "full" / "checkpoints"), on_step=full.__setitem__)

    resumed = {}
    store = LocalCheckpoints(tmp_path / "cut" / "checkpoints")
    plan = _plan(path, tmp_path / "cut", checkpoint_every=3)
    # a run killed after step 4: its last checkpoint is step 3
    killed = _setup(plan)
    with pytest.raises(ValueError, match="ran out after 4 batches"):
        killed.fit(batches[:4], store, on_step=resumed.__setitem__)
    saved = checkpoint.latest(store.root)
    assert saved.name == "step-00000003"
    assert {p.name for p in saved.iterdir()} >= {"trainable.safetensors", "optimizer.pt", "trainer.pt", "rng-0.pt"}
    torch.manual_seed(1234)  # disturb every RNG and start from a fresh process state
    second = _setup(plan)
    second.fit(batches, store, on_step=resumed.__setitem__)  # resumes at step 3, skips the 3 consumed batches
    assert second.step == 6 and second.batches_seen == 6
    for step in range(1, 7):
        for key in ("loss", "ard_q", "ard_k", "ard_v", "lr", "grad_norm"):
            assert resumed[step][key] == full[step][key], (step, key)


def _fsdp_worker(rank, path, out, port, compiled):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    plan = _plan(path, out, lora_dropout=0.0, gradient_checkpointing=True, warmup_steps=0, steps=3, batch_size=2,
                 grad_accum=2, checkpoint_every=0, compile=compiled)
    cfg = plan.stages[0].config
    seed_everything(0)
    teacher, student, _ = build_teacher_student(plan.models, cfg.lora)
    shard_teacher_student(teacher, student)  # as the Ray Train worker does
    trainer = Trainer(cfg, teacher, student)
    seen = {}
    trainer.fit([{"input_ids": b["input_ids"][2 * rank:2 * rank + 2]} for b in _batches(3)],
                LocalCheckpoints(out / "checkpoints"), on_step=seen.__setitem__)  # collective checkpoint at the end
    losses = [seen[step]["loss"] for step in (1, 2, 3)]
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
    sharded = [torch.load(tmp_path / f"losses-{r}.pt") for r in range(2)]

    plan = _plan(path, tmp_path / "single", lora_dropout=0.0, warmup_steps=0, steps=3, grad_accum=2,
                 checkpoint_every=0)
    trainer = _setup(plan)
    single = [trainer.train_step(b)["loss"] for b in _batches(3)]
    # every rank reports the step's loss averaged over the ranks: that of one process on the whole batch
    assert sharded[0] == pytest.approx(single, rel=1e-4) and sharded[1] == sharded[0]
    saved = load_file(checkpoint.latest(tmp_path / "checkpoints") / "trainable.safetensors")
    for name, value in trainer.student.state_dict().items():
        if name in saved:
            torch.testing.assert_close(saved[name], value, rtol=1e-3, atol=1e-5)
