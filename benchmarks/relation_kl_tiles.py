"""Tile sweep for the Triton relation-KL kernels: each kernel pinned to one (BLOCK_M, BLOCK_N, warps, stages) at a
time, the others autotuned, timed through the public op (B=1, H=32, D=128, bf16, causal) beside torch SDPA flash
fwd+bwd. Shared memory and registers per program come from the compiled kernel, so the table also says how
many programs fit on one SM. This is how the lists in `kernels/relation_kl_triton.py::_TILES` are chosen.

    python benchmarks/relation_kl_tiles.py --T 8192 32768      # CUDA only; prints a table, writes JSON
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

import torch
import triton

from harness import ROOT, environment, timed, write_json  # noqa: E402
from relation_kl import inputs, kl_forward, kl_step, sdpa_step  # noqa: E402

from linearard.kernels import relation_kl_triton as kernels  # noqa: E402

# Candidate tiles per kernel; (BLOCK_M, BLOCK_N, warps, stages). Row-parallel kernels stream BLOCK_N columns past
# BLOCK_M resident rows, the column kernels the reverse.
CANDIDATES = {
    "fwd": [(128, 64, 8, 2), (128, 64, 8, 3), (128, 128, 8, 2), (128, 32, 8, 2), (64, 64, 8, 2), (64, 64, 4, 2),
            (64, 64, 4, 3), (64, 32, 4, 2), (64, 32, 4, 3)],
    "dq": [(128, 64, 8, 2), (128, 64, 8, 3), (128, 32, 8, 3), (128, 32, 8, 2), (64, 64, 4, 2), (64, 64, 4, 3),
           (64, 32, 4, 2), (64, 32, 4, 3)],
    "dk": [(64, 128, 8, 2), (64, 128, 8, 3), (32, 128, 8, 2), (32, 128, 8, 3), (64, 64, 8, 2), (64, 64, 4, 2),
           (32, 64, 4, 2), (32, 64, 4, 3), (32, 64, 8, 2), (16, 64, 4, 2)],
}
# Which autotuner each sweep pins, which candidate list it takes, and what is timed.
# The last item tells the variant's compiled kernel apart (one JIT function serves both column kernels).
SWEEPS = {
    "fwd": ("_fwd", "fwd", "forward", {}),
    "atomic dk+dq (tma)": ("_dk_dq_atomic", "dk", "step", {"DQ_ATOMIC": True, "DQ_TMA": True}),
    "atomic dk+dq (pointer atomics)": ("_dk_dq_atomic", "dk", "step", {"DQ_ATOMIC": True, "DQ_TMA": False}),
    "det dq": ("_dq", "dq", "det step", {}),
    "det dk": ("_dk", "dk", "det step", {"DQ_ATOMIC": False}),
}


def pinned(tuner, tile):
    """Pin an autotuner to one tile (no tuning); returns the original list to restore."""
    original = tuner.configs
    m, n, w, s = tile
    tuner.configs = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s,
                                   pre_hook=original[0].pre_hook)]
    tuner.cache.clear()
    return original


def resources(tuner, tile, variant):
    """(registers, shared bytes) of the tuner's compiled kernel with this tile and these constexprs."""
    fn = tuner.fn
    block = {(fn.arg_names.index(k),): v for k, v in dict(variant, BLOCK_M=tile[0], BLOCK_N=tile[1]).items()}
    for kernel in fn.device_caches[torch.cuda.current_device()][0].values():
        if (all(kernel.src.constants.get(k) == v for k, v in block.items())
                and (kernel.metadata.num_warps, kernel.metadata.num_stages) == tile[2:]):
            return kernel.n_regs, kernel.metadata.shared
    return None, None


def programs_per_sm(regs, smem, warps):
    props = torch.cuda.get_device_properties(0)
    if regs is None:
        return None
    by_regs = props.regs_per_multiprocessor // (regs * 32 * warps)
    by_smem = props.shared_memory_per_multiprocessor // (smem + 1024)
    return min(by_regs, by_smem, 64 // warps)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--T", type=int, nargs="+", default=[8192, 32768])
    ap.add_argument("--sweeps", nargs="+", default=list(SWEEPS))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("relation_kl_tiles: needs a CUDA device")
    device = torch.device("cuda")
    card = torch.cuda.get_device_name(0)
    rows, compiled = [], {}
    for T in args.T:
        x = inputs(1, 32, 32, 32, T, 128, 128, torch.bfloat16, device)
        sdpa_ms = timed(sdpa_step(1, 32, 32, T, 128, device, torch.bfloat16), device) * 1e3
        print(json.dumps({"T": T, "sdpa_ms": sdpa_ms}), flush=True)
        for sweep in args.sweeps:
            name, tiles, what, variant = SWEEPS[sweep]
            kernels._DQ_TMA = "pointer" not in sweep
            tuner = getattr(kernels, name)
            fn = {"forward": kl_forward(x, "triton"), "step": kl_step(x, "triton"),
                  "det step": kl_step(x, "triton", deterministic=True)}[what]
            for tile in CANDIDATES[tiles]:
                original = pinned(tuner, tile)
                row = {"T": T, "sweep": sweep, "timed": what, "tile": list(tile), "sdpa_ms": sdpa_ms}
                try:
                    row["ms"] = timed(fn, device, budget_s=0.5, max_reps=20) * 1e3
                    if (sweep, tile) not in compiled:  # a later T hits the same compiled kernel
                        regs, smem = resources(tuner, tile, variant)
                        compiled[sweep, tile] = dict(regs=regs, smem=smem,
                                                     per_sm=programs_per_sm(regs, smem, tile[2]))
                    row.update(compiled[sweep, tile])
                except Exception as e:  # a tile that does not fit must not lose the rest of the sweep
                    row["ms"], row["error"] = None, f"{type(e).__name__}: {str(e)[:160]}"
                tuner.configs = original
                tuner.cache.clear()
                rows.append(row)
                print(json.dumps(row), flush=True)
            kernels._DQ_TMA = True
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.date.today().isoformat()
    path = write_json(out / f"relation_kl_tiles-{stamp}-{card.replace(' ', '-')}.json",
                      {**environment(device), "rows": rows})
    print(f"\n{card}; ms (ratio = op / sdpa-flash fwd+bwd for steps, / nothing for the forward); programs per SM")
    for T in args.T:
        for sweep in args.sweeps:
            print(f"T={T} {sweep}:")
            for r in (r for r in rows if r["T"] == T and r["sweep"] == sweep):
                ms = f"{r['ms']:8.2f}" if r["ms"] else "    fail"
                ratio = f"{r['ms'] / r['sdpa_ms']:.3f}" if r["ms"] and r["timed"] != "forward" else ""
                print(f"  {str(tuple(r['tile'])):18s} {ms} {ratio:>6} regs {r.get('regs')} smem {r.get('smem')} "
                      f"per SM {r.get('per_sm')} {r.get('error', '')}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
