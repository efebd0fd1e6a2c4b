"""The whole ARD training step at 7B scale: tokens/s, peak memory, the relation-KL's share of the step, and the
overhead over a CPT step (LM loss only), on one GPU and with FSDP2 across several. Prints a table, writes JSON.

Models are built from Llama-2-7B / Llama-3-8B shaped configs with random weights straight on the GPU (speed and
memory do not depend on the weights); everything else is the library's own path: ``build_teacher_student``
(bf16, LoRA on q/k/v, non-reentrant gradient checkpointing), ``Trainer.train_step`` (bf16 autocast, AdamW,
clipping). Per model and context, three steps are timed side by side in one process, B=1:

    ard        the ARD step (teacher forward, student forward + backward, relation KL on Q, K, V of every layer)
    ard_no_kl  the same step with ``relation_kl`` swapped for a free stand-in (KL share = 1 - ard_no_kl / ard)
    lm         the student alone with a next-token loss, what CPT costs per token (overhead = ard / lm)

    python benchmarks/ard_step.py --tiny                            # CPU smoke test (2-layer model)
    python benchmarks/ard_step.py --models llama2-7b --out a.json   # one GPU
    torchrun --nproc_per_node 2 benchmarks/ard_step.py --fsdp --modes ard --out b.json   # FSDP2, per-GPU numbers
    python benchmarks/ard_step.py --combine a.json b.json --out all.json   # one table + scaling efficiency
    python benchmarks/ard_step.py --models llama2-7b --contexts 4096 --modes ard --profile --out p.json
                                                                    # + where one step's GPU time goes
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from unittest import mock

import torch
import torch.distributed as dist

from harness import environment, sync, write_json  # noqa: E402  (also: the import path of a bare checkout)
from transformers import AutoModelForCausalLM, LlamaConfig  # noqa: E402

from linearard import losses, models  # noqa: E402
from linearard.config import RunConfig  # noqa: E402
from linearard.plan import resolve  # noqa: E402
from linearard.distributed import shard_teacher_student  # noqa: E402
from linearard.models import build_teacher_student  # noqa: E402
from linearard.tiny import bundled_model_path  # noqa: E402
from linearard.train import Trainer, seed_everything  # noqa: E402

GiB = 2**30
# teacher shapes (LlamaConfig fields) and the student's RoPE
SHAPES = {
    "llama2-7b": (dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096,
                       rope_parameters={"rope_type": "default", "rope_theta": 10000.0}), "linear:8"),
    "llama3-8b": (dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192,
                       rope_parameters={"rope_type": "default", "rope_theta": 500000.0}), "yarn:4"),
    # Llama-2-7B's layer shapes with 2 layers: what benchmarks/ray_gpu.sh runs through the Ray job side by side
    "llama2-7b-2l": (dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=2, num_attention_heads=32,
                          num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096,
                          rope_parameters={"rope_type": "default", "rope_theta": 10000.0}), "linear:8"),
    "tiny": (dict(hidden_size=128, intermediate_size=352, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=259, max_position_embeddings=256,
                  rope_parameters={"rope_type": "default", "rope_theta": 10000.0}), "linear:4"),
}
MODES = ("ard", "ard_no_kl", "lm")
RELATION_KL_KERNELS = ("_fwd_kernel", "_dq_kernel", "_dk_kernel")  # the Triton kernels of linearard.kernels


# ------------------------------------------------------------------------------------------- models
def random_weights_loader(device: torch.device):
    """Stands in for ``AutoModelForCausalLM`` inside ``linearard.models``: ``from_pretrained(path, config=...)``
    builds the model from ``config`` with random weights directly on ``device`` (nothing is read or saved)."""

    class RandomWeights:
        @staticmethod
        def from_pretrained(_path, *, config, dtype, attn_implementation, **_):
            with torch.device(device):
                return AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn_implementation)

    return RandomWeights


def build(name: str, lora_r: int, device: torch.device, dtype: str, folder: Path, compiled: bool = False):
    """``(stage config, teacher, student)`` for a shape of ``SHAPES`` (the teacher's config.json goes to
    ``folder``)."""
    fields, rope = SHAPES[name]
    LlamaConfig(**fields, tie_word_embeddings=False, rms_norm_eps=1e-5).save_pretrained(folder)
    plan = resolve(RunConfig.from_dict({
        "model": {"teacher": str(folder), "student": None, "tokenizer": str(bundled_model_path()), "rope": rope,
                  "dtype": dtype,
                  "trainable": "lora", "gradient_checkpointing": True},
        "lora": {"r": lora_r, "alpha": 2.0 * lora_r},  # the published recipe: r=1024, alpha=2048
        "optim": {"warmup_steps": 0},
        "train": {"steps": 10**6, "batch_size": 1, "progress_bar": False, "compile": compiled},
    }))
    cfg = plan.stages[0].config
    seed_everything(0)
    with mock.patch.object(models, "AutoModelForCausalLM", random_weights_loader(device)):
        teacher, student, _ = build_teacher_student(plan.models, cfg.lora, device)
    gc.collect()  # the student's own copies of the weights it now shares with the teacher
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return cfg, teacher, student


def free_relation_kl(s_rows, s_cols, t_rows, t_cols, **_):
    """A zero-cost stand-in for ``relation_kl``: a scalar 0 that still depends on the student's tensor."""
    return s_rows.reshape(-1)[0].float() * 0


# ------------------------------------------------------------------------------------------ measure
def measure_mode(cfg: RunConfig, teacher, student, mode: str, ctx: int, device: torch.device,
                 warmup: int, steps: int, seed: int, profile_top: int = 0) -> dict:
    """Time ``steps`` optimizer steps of ``mode`` (after ``warmup``); peak memory over all of them. With
    ``profile_top`` > 0 (CUDA), one more step runs under the profiler (``profile_step``)."""
    mode_cfg = copy.deepcopy(cfg)
    weights = {"q": 0.0, "k": 0.0, "v": 0.0, "lm": 1.0} if mode == "lm" else {"q": 1.0, "k": 1.0, "v": 1.0}
    for key, value in weights.items():
        setattr(mode_cfg.loss, key, value)
    vocab = student.config.get_text_config().vocab_size
    generator = torch.Generator().manual_seed(seed)
    record = {"mode": mode, "ctx": ctx}
    trainer = None
    try:
        with mock.patch.object(losses, "relation_kl", free_relation_kl) if mode == "ard_no_kl" \
                else contextlib.nullcontext():
            trainer = Trainer(mode_cfg, teacher, student, device=device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            times = []
            for index in range(warmup + steps):
                batch = {"input_ids": torch.randint(0, vocab, (1, ctx), generator=generator)}
                sync(device)
                start = time.perf_counter()
                metrics = trainer.train_step(batch)
                sync(device)
                if index >= warmup:
                    times.append(time.perf_counter() - start)
        if profile_top and device.type == "cuda":
            batch = {"input_ids": torch.randint(0, vocab, (1, ctx), generator=generator)}
            record["profile"] = profile_step(lambda: trainer.train_step(batch), device, profile_top)
        step_s = statistics.median(times)
        if dist.is_initialized():  # the slowest rank sets the pace
            step_s = _all_reduce_max(step_s, device)
        record.update(status="ok", step_s=step_s, tokens_per_s=ctx / step_s, loss=metrics["loss"])
        if device.type == "cuda":
            peak = [torch.cuda.max_memory_allocated(device) / GiB, torch.cuda.max_memory_reserved(device) / GiB]
            if dist.is_initialized():
                peak = [_all_reduce_max(value, device) for value in peak]
            record.update(peak_alloc_gib=peak[0], peak_reserved_gib=peak[1])
    except torch.OutOfMemoryError as err:
        record.update(status="OOM", error=str(err).splitlines()[0][:300])
    finally:
        if trainer is not None:
            trainer.objective.release()
        del trainer
        for param in student.parameters():
            param.grad = None
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return record


# Kinds of GPU kernels in a step, by name (the first that matches; cuBLAS/cuDNN kernel names are not an API, so
# this is a reading aid, not an accounting standard).
KERNEL_KINDS = {
    "relation-KL (Triton)": RELATION_KL_KERNELS,
    "matmul": ("nvjet", "gemm", "cutlass", "xmma"),
    "attention (SDPA)": ("sdpa", "flash", "fmha", "attention"),
    "compiled norms and MLPs (inductor)": ("triton_poi", "triton_red", "triton_per"),
    "elementwise, copies, reductions": ("at::native",),
    "other": (),
}


def kernel_kind(name: str) -> str:
    for kind, patterns in KERNEL_KINDS.items():
        if any(p in name for p in patterns):
            return kind
    return "other"


def profile_step(step, device: torch.device, top: int) -> dict:
    """GPU kernel time of one ``step()`` under torch.profiler: the total, by kind of kernel (``KERNEL_KINDS``), and
    the ``top`` kernels by GPU time."""
    from torch.profiler import ProfilerActivity, profile

    sync(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        sync(device)
    by_name: dict[str, list[float]] = {}
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA and event.device_time_total > 0:
            calls_ms = by_name.setdefault(event.name, [0, 0.0])
            calls_ms[0] += 1
            calls_ms[1] += event.device_time_total / 1e3
    kinds = dict.fromkeys(KERNEL_KINDS, 0.0)
    for name, (_, ms) in by_name.items():
        kinds[kernel_kind(name)] += ms
    ranked = sorted(by_name.items(), key=lambda kv: kv[1][1], reverse=True)
    return {"gpu_ms": sum(kinds.values()), "by_kind_ms": kinds,
            "top_kernels": [{"kernel": name[:120], "kind": kernel_kind(name), "calls": calls, "gpu_ms": ms}
                            for name, (calls, ms) in ranked[:top]]}


def _all_reduce_max(value: float, device: torch.device) -> float:
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return float(tensor)


# ---------------------------------------------------------------------------------------------- run
def run(args) -> dict:
    distributed = args.fsdp
    if distributed:
        backend = "nccl" if torch.cuda.is_available() and not args.tiny else "gloo"
        dist.init_process_group(backend)
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
    rank = dist.get_rank() if distributed else 0
    world = dist.get_world_size() if distributed else 1
    if args.tiny or not torch.cuda.is_available():
        device = torch.device("cpu")
    else:
        device = torch.device("cuda", torch.cuda.current_device())
    result = {"benchmark": "ard_step", **environment(device), "gpus": world, "fsdp": distributed,
              "compile": args.compile, "lora_r": args.lora_r, "batch": 1, "warmup": args.warmup, "steps": args.steps,
              "records": []}
    start = time.monotonic()

    def save():
        if rank == 0 and args.out:
            write_json(Path(args.out), result)

    for name in args.models:
        if time.monotonic() - start > args.budget_s:
            result["records"].append({"model": name, "status": "skipped (time budget)"})
            continue
        with tempfile.TemporaryDirectory() as folder:
            t0 = time.monotonic()
            try:
                cfg, teacher, student = build(name, args.lora_r, device, args.dtype, Path(folder), args.compile)
            except torch.OutOfMemoryError as err:
                result["records"].append({"model": name, "status": "OOM at build", "error": str(err)[:300]})
                save()
                continue
            if distributed:
                shard_teacher_student(teacher, student)
            build_s = time.monotonic() - t0
            if rank == 0:
                print(f"[{name}] built in {build_s:.1f}s", flush=True)
            for ctx in args.contexts:
                if args.compile:
                    torch._dynamo.reset()  # graphs for this length only (each mode's warm-up step compiles)
                for mode in args.modes:
                    if time.monotonic() - start > args.budget_s:
                        record = {"mode": mode, "ctx": ctx, "status": "skipped (time budget)"}
                    else:
                        record = measure_mode(cfg, teacher, student, mode, ctx, device, args.warmup, args.steps,
                                              seed=1000 * rank + ctx, profile_top=args.profile_top
                                              if args.profile and mode == "ard" else 0)
                    record.update(model=name, gpus=world)
                    result["records"].append(record)
                    if rank == 0:
                        print(json.dumps(record), flush=True)
                    save()
            del teacher, student
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    if distributed:
        dist.destroy_process_group()
    return result


# ------------------------------------------------------------------------------------------- report
def table(records: list[dict]) -> str:
    """One row per (model, ctx, gpus): the ARD step, the KL share, the CPT overhead and, with FSDP, the scaling."""
    one_gpu = {(r["model"], r["ctx"]): r for r in records if r.get("mode") == "ard" and r.get("gpus") == 1
               and r.get("status") == "ok"}
    groups: dict[tuple, dict[str, dict]] = {}
    for r in records:
        if "ctx" in r:
            groups.setdefault((r["model"], r["gpus"], r["ctx"]), {})[r["mode"]] = r
    lines = ["| model | GPUs | ctx | ARD tok/s/GPU | ARD step s | peak GiB/GPU (alloc/reserved) | KL share | "
             "CPT tok/s | ARD/CPT time | scaling |", "|" + "---|" * 10]
    for (model, gpus, ctx), by_mode in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2])):
        ard, no_kl, lm = by_mode.get("ard", {}), by_mode.get("ard_no_kl", {}), by_mode.get("lm", {})

        def ok(r):
            return r.get("status") == "ok"
        tps = f"{ard['tokens_per_s']:.0f}" if ok(ard) else ard.get("status", "—")
        step = f"{ard['step_s']:.2f}" if ok(ard) else "—"
        mem = (f"{ard['peak_alloc_gib']:.1f} / {ard['peak_reserved_gib']:.1f}" if ok(ard) and "peak_alloc_gib" in ard
               else "—")
        share = f"{1 - no_kl['step_s'] / ard['step_s']:.1%}" if ok(ard) and ok(no_kl) else no_kl.get("status", "—")
        cpt = f"{lm['tokens_per_s']:.0f}" if ok(lm) else lm.get("status", "—")
        ratio = f"{ard['step_s'] / lm['step_s']:.2f}" if ok(ard) and ok(lm) else "—"
        base = one_gpu.get((model, ctx))
        scaling = (f"{ard['tokens_per_s'] / base['tokens_per_s']:.1%}" if gpus > 1 and ok(ard) and base else "—")
        lines.append(f"| {model} | {gpus} | {ctx // 1024 if ctx >= 1024 else ctx}{'K' if ctx >= 1024 else ''} | "
                     f"{tps} | {step} | {mem} | {share} | {cpt} | {ratio} | {scaling} |")
    return "\n".join(lines)


def profile_table(records: list[dict]) -> str:
    """Per profiled ARD step: its GPU kernel time by kind, then the top kernels."""
    lines = []
    for r in records:
        prof = r.get("profile")
        if not prof:
            continue
        total = prof["gpu_ms"]
        lines += [f"\n{r['model']}, ctx {r['ctx']}: one ARD step, {total:.1f} ms of GPU kernels",
                  "| kind | GPU ms | share |", "|---|---|---|"]
        lines += [f"| {kind} | {ms:.1f} | {ms / max(total, 1e-9):.1%} |" for kind, ms in prof["by_kind_ms"].items()]
        lines += ["| kernel | kind | calls | GPU ms |", "|---|---|---|---|"]
        lines += [f"| {k['kernel'][:70]} | {k['kind']} | {k['calls']} | {k['gpu_ms']:.1f} |"
                  for k in prof["top_kernels"]]
    return "\n".join(lines)


def combine(paths: list[str]) -> dict:
    parts = [json.loads(Path(p).read_text()) for p in paths if Path(p).exists()]
    if not parts:
        raise SystemExit(f"none of {paths} exists")
    merged = {k: v for k, v in parts[0].items() if k not in ("records", "gpus", "fsdp")}
    merged["records"] = [r for part in parts for r in part["records"]]
    merged["runs"] = [{k: v for k, v in part.items() if k != "records"} for part in parts]
    return merged


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=sorted(SHAPES), default=["llama2-7b", "llama3-8b"])
    parser.add_argument("--contexts", nargs="+", type=int, default=[4096, 8192, 16384])
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--lora-r", type=int, default=1024)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first (Triton autotune, AdamW state)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps (median)")
    parser.add_argument("--budget-s", type=float, default=1e9, help="start no new configuration after this")
    parser.add_argument("--fsdp", action="store_true", help="FSDP2 across the torchrun processes")
    parser.add_argument("--compile", action="store_true",
                        help="train.compile: torch.compile the decoder layers' norms and MLPs (warm-up compiles)")
    parser.add_argument("--profile", action="store_true",
                        help="profile one more ARD step (CUDA): its GPU kernel time by kind and the top kernels")
    parser.add_argument("--profile-top", type=int, default=15, help="kernels listed by --profile")
    parser.add_argument("--tiny", action="store_true", help="CPU smoke test: 2-layer model, ctx 64/128, r=8")
    parser.add_argument("--combine", nargs="+", metavar="JSON", help="merge result files and print one table")
    parser.add_argument("--out", help="JSON file to write")
    args = parser.parse_args()
    if args.combine:
        result = combine(args.combine)
    else:
        if args.tiny:
            args.models, args.contexts, args.lora_r, args.steps = ["tiny"], [64, 128], 8, 2
        result = run(args)
        if dist.is_initialized() or int(os.environ.get("RANK", 0)) != 0:
            return
    print(table(result["records"]))
    if any("profile" in r for r in result["records"]):
        print(profile_table(result["records"]))
    if args.out:
        print(f"wrote {write_json(Path(args.out), result)}")


if __name__ == "__main__":
    main()
