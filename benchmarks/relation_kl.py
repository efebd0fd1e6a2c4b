"""relation_kl fwd+bwd: time and peak extra memory per backend, against a dense PyTorch baseline (T×T maps)
and torch SDPA flash attention at the same shape; exactness of bf16 against the float64 reference first.
The Triton backend is timed with both backward variants side by side: "triton" (dQ by fp32 atomics) and
"triton det" (``deterministic=True``: a row-parallel dQ pass, no atomics). Prints a table last and writes JSON.

    python benchmarks/relation_kl.py            # CUDA: the issue-3 sweep (B=1, H=32, D=128, bf16, causal)
    python benchmarks/relation_kl.py --quick    # CPU: small T, torch backend vs dense (ratios only)
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import sys
import time
from pathlib import Path

import torch

from harness import environment, results_path, sync, timed, write_json  # noqa: E402  (also: the import path)

from linearard.kernels import relation_kl  # noqa: E402
from linearard.kernels.reference import relation_kl_dense  # noqa: E402

K = 1024


def inputs(B, H, Hc, Hct, T, Ds, Dt, dtype, device, self_rel=False, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    def randn(*shape):
        return torch.randn(*shape, generator=g, device=device, dtype=torch.float32).to(dtype)
    s_rows = randn(B, H, T, Ds).requires_grad_(True)
    s_cols = s_rows if self_rel else randn(B, Hc, T, Ds).requires_grad_(True)
    t_rows = randn(B, H, T, Dt)
    t_cols = t_rows if self_rel else randn(B, Hct, T, Dt)
    return s_rows, s_cols, t_rows, t_cols


def leaves(x):
    return [x[0]] if x[1] is x[0] else [x[0], x[1]]


def nbytes(*tensors):
    seen = {}
    for t in tensors:
        if t is not None:
            seen[t.data_ptr()] = t.numel() * t.element_size()
    return sum(seen.values())


def peak_extra(fn, device):
    """Peak bytes allocated above what was live before fn() (CUDA only)."""
    if device.type != "cuda":
        return None
    sync(device)
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    sync(device)
    return torch.cuda.max_memory_allocated() - base


def measure(name, fn, device, results, **extra):
    row = {"case": name, **extra}
    try:
        row["ms"] = timed(fn, device) * 1e3
        row["peak_extra_bytes"] = peak_extra(fn, device)
    except torch.OutOfMemoryError:
        row["ms"] = None
        row["error"] = "out of memory"
    except Exception as e:  # one failing case must not lose the rest of the run
        row["ms"] = None
        row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
    if device.type == "cuda":
        torch.cuda.empty_cache()
    results.append(row)
    print(json.dumps(row), flush=True)
    return row


def kl_step(x, backend, **kw):
    def step():
        for t in leaves(x):
            t.grad = None
        if backend == "dense":
            relation_kl_dense(*x, **kw, compute_dtype=torch.float32).backward()
        else:
            relation_kl(*x, **kw, backend=backend).backward()
    return step


def kl_forward(x, backend, **kw):
    def fwd():
        with torch.no_grad():
            relation_kl(*x, **kw, backend=backend)
    return fwd


def sdpa_step(B, H, Hc, T, D, device, dtype, fwd_only=False):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    import torch.nn.functional as F

    q = torch.randn(B, H, T, D, device=device, dtype=dtype, requires_grad=True)
    k = torch.randn(B, Hc, T, D, device=device, dtype=dtype, requires_grad=True)
    v = torch.randn(B, Hc, T, D, device=device, dtype=dtype, requires_grad=True)
    d_out = torch.randn(B, H, T, D, device=device, dtype=dtype)

    def step():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            if fwd_only:
                with torch.no_grad():
                    F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=Hc != H)
                return
            q.grad = k.grad = v.grad = None
            F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=Hc != H).backward(d_out)
    return step


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30)).item()


def label(backend, deterministic):
    return "triton-det" if backend == "triton" and deterministic else backend


def check_exact(name, backend, deterministic, B, H, Hc, Hct, T, Ds, Dt, causal, padded, segmented, self_rel,
                device, dtype, checks, seed=1):
    """Loss and grads of `backend` in `dtype` vs the dense float64 reference on the same (rounded) inputs."""
    x = inputs(B, H, Hc, Hct, T, Ds, Dt, dtype, device, self_rel, seed)
    kw = dict(causal=causal)
    if padded:
        mask = torch.ones(B, T, dtype=torch.bool, device=device)
        mask[0, -T // 5:] = False
        mask[-1, : T // 7] = False
        kw["mask"] = mask
    if segmented:
        g = torch.Generator(device=device).manual_seed(seed)
        kw["segment_ids"] = torch.cumsum(torch.rand(B, T, generator=g, device=device) < 4.0 / T, dim=1)
    loss = relation_kl(*x, **kw, backend=backend, deterministic=deterministic)
    loss.backward()
    grads = [t.grad for t in leaves(x)]
    ref_x = [t.detach().double() for t in x]
    ref_x[0].requires_grad_(True)
    if self_rel:
        ref_x[1] = ref_x[0]
        ref_x[3] = ref_x[2]
    else:
        ref_x[1].requires_grad_(True)
    ref = relation_kl_dense(*ref_x, **kw)
    ref.backward()
    ref_grads = [t.grad for t in leaves(ref_x)]
    row = {"case": name, "backend": label(backend, deterministic), "dtype": str(dtype).split(".")[-1], "T": T,
           "loss_rel_err": rel(loss, ref), **{f"grad{i}_rel_err": rel(g, r) for i, (g, r) in
                                             enumerate(zip(grads, ref_grads))}}
    row["ok"] = all(v < 1e-2 for k, v in row.items() if k.endswith("rel_err")) and bool(torch.isfinite(loss))
    checks.append(row)
    print(json.dumps(row), flush=True)
    del x, ref_x
    torch.cuda.empty_cache()


def check_tail(T, device, dtype, checks, n=64, H=32, D=128):
    """At long T no dense map fits: check the last n rows (KL, dQ) and last n columns (dK, which only those
    rows reach under the causal mask) and the first n rows' KL, against float64 computed for those rows only;
    both backward variants against one reference."""
    x = inputs(1, H, H, H, T, D, D, dtype, device, seed=2)
    scale = 1 / math.sqrt(D)
    q = x[0][:, :, -n:].detach().double().requires_grad_(True)
    k = x[1].detach().double().requires_grad_(True)
    qt, kt = x[2][:, :, -n:].double(), x[3].double()
    valid = torch.arange(T, device=device)[None, :] <= torch.arange(T - n, T, device=device)[:, None]
    lp_s = torch.where(valid, (scale * q @ k.transpose(-1, -2)).masked_fill(~valid, -math.inf).log_softmax(-1), 0)
    lp_t = torch.where(valid, (scale * qt @ kt.transpose(-1, -2)).masked_fill(~valid, -math.inf).log_softmax(-1), 0)
    kl_ref = torch.where(valid, lp_t.exp() * (lp_t - lp_s), 0.0).sum(-1)
    del lp_t, lp_s, qt, kt
    kl_ref.sum().backward()
    head = relation_kl_dense(*(t[:, :, :n].detach() for t in x), reduction="none")
    for deterministic in (False, True):
        for t in leaves(x):
            t.grad = None
        kl = relation_kl(*x, reduction="none", backend="triton", deterministic=deterministic)
        kl.sum().backward()
        row = {"case": f"tail+head rows T={T}", "backend": label("triton", deterministic),
               "dtype": str(dtype).split(".")[-1], "T": T, "loss_rel_err": rel(kl[:, :, -n:], kl_ref),
               "head_kl_rel_err": rel(kl[:, :, :n], head), "grad0_rel_err": rel(x[0].grad[:, :, -n:], q.grad),
               "grad1_rel_err": rel(x[1].grad[:, :, -n:], k.grad[:, :, -n:])}
        row["ok"] = all(v < 1e-2 for k_, v in row.items() if k_.endswith("rel_err"))
        checks.append(row)
        print(json.dumps(row), flush=True)
        del kl
    del x, q, k, kl_ref
    torch.cuda.empty_cache()


def tuned_configs():
    """The tile each Triton autotuner picked, per tuning key (empty if the Triton backend never ran)."""
    module = sys.modules.get("linearard.kernels.relation_kl_triton")
    if module is None:
        return {}
    return {name: {str(key): str(config) for key, config in getattr(module, name).cache.items()}
            for name in ("_fwd", "_dq", "_dk", "_dk_dq_atomic")}


def guarded(check, *args):
    try:
        check(*args)
    except Exception as e:
        args[-1].append({"case": str(args[:2]), "backend": "?", "ok": False, "error": f"{type(e).__name__}: {e}"})
        print(json.dumps(args[-1][-1]), flush=True)
    torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="CPU-sized sweep")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default: $OUT or benchmarks/results)")
    parser.add_argument("--skip-checks", action="store_true", help="no exactness checks (timings only)")
    parser.add_argument("--max-t", type=int, default=None,
                        help="longest T of the sweep and the tail checks (default 128K on CUDA)")
    args = parser.parse_args()

    cuda = torch.cuda.is_available() and not args.quick
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    meta = {**environment(device), "device": str(device), "dtype": str(dtype),
            "deterministic_default": inspect.signature(relation_kl).parameters["deterministic"].default}
    print(json.dumps(meta), flush=True)
    checks, sweep, variants = [], [], []
    started = time.perf_counter()
    elapsed = meta["elapsed_s"] = {}  # per section, compiling and autotuning included

    if cuda and not args.skip_checks:
        # name, B, H, Hc, Hct, T, Ds, Dt, causal, padded, segmented, self_rel
        shapes = [("D128 causal", 1, 8, 8, 8, 2048, 128, 128, True, False, False, False),
                  ("D64 GQA H/4 mask+seg odd T", 2, 8, 2, 8, 1001, 64, 64, True, True, True, False),
                  ("D256 GQA H/8 non-causal", 1, 8, 1, 1, 777, 256, 256, False, False, False, False),
                  ("self-relation Ds!=Dt", 1, 4, 4, 4, 1500, 128, 64, True, True, False, True)]
        for s in shapes:
            for backend, deterministic in (("triton", False), ("triton", True), ("torch", False)):
                guarded(check_exact, s[0], backend, deterministic, *s[1:], device, dtype, checks)
        elapsed["checks"] = time.perf_counter() - started

    H, D = (32, 128) if cuda else (4, 64)
    Ts = [1 * K, 2 * K, 4 * K, 8 * K, 16 * K, 32 * K, 64 * K, 128 * K] if cuda else [256, 512, 1 * K, 2 * K]
    Ts = [T for T in Ts if args.max_t is None or T <= args.max_t]
    for T in Ts:
        x = inputs(1, H, H, H, T, D, D, dtype, device)
        in_bytes = nbytes(*x)
        if cuda:
            measure("sdpa-flash", sdpa_step(1, H, H, T, D, device, dtype), device, sweep, T=T)
            measure("sdpa-flash fwd", sdpa_step(1, H, H, T, D, device, dtype, True), device, sweep, T=T)
            measure("triton", kl_step(x, "triton", deterministic=False), device, sweep, T=T, input_bytes=in_bytes)
            measure("triton det", kl_step(x, "triton", deterministic=True), device, sweep, T=T,
                    input_bytes=in_bytes)
            measure("triton fwd", kl_forward(x, "triton"), device, sweep, T=T, input_bytes=in_bytes)
        if T <= (16 * K if cuda else 2 * K):
            measure("torch", kl_step(x, "torch"), device, sweep, T=T, input_bytes=in_bytes)
        if T <= (8 * K if cuda else 1 * K):
            measure("dense", kl_step(x, "dense"), device, sweep, T=T, input_bytes=in_bytes)
        del x
    elapsed["sweep"] = time.perf_counter() - started - sum(elapsed.values())

    if cuda:  # other head sizes, GQA, masks, self-relations at 8K
        T = 8 * K
        for name, Hc, Ds, self_rel, masked in [("D=64", 32, 64, False, False), ("D=256", 32, 256, False, False),
                                               ("GQA Hc=H/4", 8, 128, False, False),
                                               ("GQA Hc=H/8", 4, 128, False, False),
                                               ("mask+segments", 32, 128, False, True),
                                               ("self-relation", 32, 128, True, False)]:
            x = inputs(1, 32, Hc, Hc, T, Ds, Ds, dtype, device, self_rel)
            kw = {}
            if masked:
                mask = torch.ones(1, T, dtype=torch.bool, device=device)
                mask[:, -T // 8:] = False
                kw = dict(mask=mask, segment_ids=torch.arange(T, device=device)[None] // (T // 4))
            sd = measure(f"sdpa-flash {name}", sdpa_step(1, 32, Hc, T, Ds, device, dtype), device, variants, T=T)
            for case, deterministic in ((f"triton {name}", False), (f"triton det {name}", True)):
                tr = measure(case, kl_step(x, "triton", **kw, deterministic=deterministic), device, variants, T=T,
                             input_bytes=nbytes(*x))
                if sd.get("ms") and tr.get("ms"):
                    tr["ratio_vs_sdpa"] = tr["ms"] / sd["ms"]
            del x
        elapsed["variants"] = time.perf_counter() - started - sum(elapsed.values())

    if cuda and not args.skip_checks:  # after the sweep, so that T = 8K, not 64K, tunes the longest T bucket
        for T in (64 * K, 128 * K):
            if args.max_t is None or T <= args.max_t:
                guarded(check_tail, T, device, dtype, checks)
        elapsed["tail checks"] = time.perf_counter() - started - sum(elapsed.values())

    meta["tuned"] = tuned_configs()
    out = write_json(results_path("relation_kl", device, args.out),
                     {"meta": meta, "checks": checks, "sweep": sweep, "variants": variants})

    def ms(case, T):
        r = next((r for r in sweep if r["case"] == case and r["T"] == T), None)
        return None if r is None else r.get("ms")

    def mem(case, T):
        r = next((r for r in sweep if r["case"] == case and r["T"] == T), None)
        return None if r is None or not r.get("peak_extra_bytes") else r["peak_extra_bytes"] / r["input_bytes"]

    def f(v, fmt="{:.2f}"):
        return "-" if v is None else fmt.format(v)

    print(f"\n{ {k: v for k, v in meta.items() if k != 'tuned'} }")
    if checks:
        print("\nexactness (rel err vs float64):")
        for c in checks:
            errs = " ".join(f"{k.replace('_rel_err', '')}={v:.1e}" for k, v in c.items() if k.endswith("rel_err"))
            print(f"  {'ok  ' if c['ok'] else 'FAIL'} {c['backend']:10s} {c['case']:32s} {errs} {c.get('error', '')}")

    def ratio(a, b):
        return a / b if a and b else None

    print(f"\nfwd+bwd ms, B=1 H={H} D={D} {str(dtype).split('.')[-1]} causal (ratio = triton / sdpa-flash; "
          "triton = dQ by atomics, det = deterministic backward; mem = peak extra / inputs)")
    print(f"{'T':>7} {'sdpa':>8} {'triton':>9} {'ratio':>6} {'det':>9} {'ratio':>6} {'det/tr':>6} {'tr.mem':>6} "
          f"{'det.mem':>7} {'tr.fwd':>8} {'sd.fwd':>8} {'torch':>9} {'t.mem':>6} {'dense':>9} {'d.mem':>6}")
    for T in Ts:
        sd, tr, det = ms("sdpa-flash", T), ms("triton", T), ms("triton det", T)
        print(f"{T:>7} {f(sd):>8} {f(tr):>9} {f(ratio(tr, sd)):>6} {f(det):>9} {f(ratio(det, sd)):>6} "
              f"{f(ratio(det, tr)):>6} {f(mem('triton', T)):>6} {f(mem('triton det', T)):>7} "
              f"{f(ms('triton fwd', T)):>8} {f(ms('sdpa-flash fwd', T)):>8} {f(ms('torch', T)):>9} "
              f"{f(mem('torch', T)):>6} {f(ms('dense', T)):>9} {f(mem('dense', T)):>6}")
    if variants:
        print("\nT=8K variants (ms, ratio vs sdpa-flash with the same D / GQA):")
        for r in variants:
            print(f"  {r['case']:32s} {f(r.get('ms')):>8} {f(r.get('ratio_vs_sdpa')):>6} {r.get('error', '')}")
    print(f"\nseconds per section: { {k: round(v) for k, v in elapsed.items()} }, "
          f"total {time.perf_counter() - started:.0f}")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
