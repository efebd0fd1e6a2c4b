"""relation_kl against the dense float64 reference: torch backend (float64 < 1e-9), triton backend through
TRITON_INTERPRET=1 on CPU (float32 < 1e-4), linear memory at T=16384, and one-line ValueErrors."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import zlib

import pytest
import torch

if not torch.cuda.is_available():  # must precede the first import of the Triton kernels (read at @jit time)
    os.environ.setdefault("TRITON_INTERPRET", "1")

from linearard.kernels import relation_kl  # noqa: E402

from linearard.kernels.reference import relation_kl_dense  # noqa: E402

# The Triton interpreter evaluates both sides of tl.where in NumPy: -inf − -inf in masked-out lanes warns.
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")

# name: B, H, Hc, Hct, T, Ds, Dt, causal, padding ("right", "left", "both", "holes", None), segments, scales, self
CASES = {
    "gqa-right-pad-segments": (2, 4, 2, 1, 37, 16, 24, True, "right", True, (0.3, 0.2), False),
    "t1": (1, 2, 2, 2, 1, 8, 8, True, None, False, (None, None), False),
    "noncausal-left-pad-full-pad-seq": (3, 4, 1, 2, 29, 12, 8, False, "left", False, (None, 0.5), False),
    "self-relation-odd-t": (2, 2, 2, 2, 53, 16, 16, True, None, False, (None, None), True),
    "holes-int-mask-segments-noncausal": (2, 6, 3, 6, 31, 8, 20, False, "holes", True, (0.7, 0.1), False),
    "both-ends-causal": (2, 4, 4, 4, 40, 32, 32, True, "both", False, (None, None), True),
}


def make_inputs(case, dtype, seed, device="cpu"):
    B, H, Hc, Hct, T, Ds, Dt, causal, padding, segments, (scale_s, scale_t), self_rel = case
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return (2 * torch.randn(*shape, generator=g, dtype=torch.float64)).to(device=device, dtype=dtype)

    s_rows = randn(B, H, T, Ds)
    s_cols = s_rows if self_rel else randn(B, Hc, T, Ds)
    t_rows = randn(B, H, T, Dt)
    t_cols = t_rows if self_rel else randn(B, Hct, T, Dt)
    mask = None
    if padding is not None:
        mask = torch.ones(B, T, dtype=torch.bool)
        if padding in ("right", "both"):
            mask[0, T - T // 3:] = False
        if padding in ("left", "both"):
            mask[-1, : T // 4] = False
        if padding == "left":
            mask[1] = False  # a fully padded sequence
        if padding == "holes":
            mask = torch.rand(B, T, generator=g) > 0.3
            mask[0, 0] = False
            mask = mask.to(torch.int64)  # 0/1 ints are accepted too
        mask = mask.to(device)
    seg = None
    if segments:
        seg = torch.cumsum(torch.rand(B, T, generator=g) < 0.15, dim=1).to(device)
    s_rows.requires_grad_(True)
    if not self_rel:
        s_cols.requires_grad_(True)
    kwargs = dict(scale_s=scale_s, scale_t=scale_t, mask=mask, segment_ids=seg, causal=causal)
    return (s_rows, s_cols, t_rows, t_cols), kwargs


def leaves(inputs):
    s_rows, s_cols = inputs[0], inputs[1]
    return [s_rows] if s_cols is s_rows else [s_rows, s_cols]


def loss_and_grads(fn, inputs, kwargs, reduction, weight_seed):
    for x in leaves(inputs):
        x.grad = None
    out = fn(*inputs, **kwargs, reduction=reduction)
    if reduction == "none":
        w = torch.rand(out.shape, generator=torch.Generator().manual_seed(weight_seed), dtype=torch.float64)
        (out.double() * w.to(out.device)).sum().backward()
    else:
        out.backward()
    return out.detach().double(), [x.grad.double().clone() for x in leaves(inputs)]


def rel_err(a, b):
    """Relative error in norm; absolute where the reference is under 1 (T = 1 gives KL = 0 exactly)."""
    return ((a - b).norm() / b.norm().clamp(min=1.0)).item()


def check(backend, case, dtype, reduction, tol, seed, device="cpu", **op_kwargs):
    """Loss and grads of relation_kl(..., backend, **op_kwargs) on CASES[case] (or a case tuple) vs float64."""
    inputs, kwargs = make_inputs(CASES[case] if isinstance(case, str) else case, dtype, seed, device)
    ref_inputs = tuple(x.detach().double() for x in inputs)
    ref_inputs = (ref_inputs[0], ref_inputs[0] if inputs[1] is inputs[0] else ref_inputs[1], *ref_inputs[2:])
    ref_inputs = tuple(x.requires_grad_(True) if i < 2 else x for i, x in enumerate(ref_inputs))
    loss, grads = loss_and_grads(lambda *a, **k: relation_kl(*a, **k, backend=backend, **op_kwargs), inputs,
                                 kwargs, reduction, seed)
    ref_loss, ref_grads = loss_and_grads(relation_kl_dense, ref_inputs, kwargs, reduction, seed)
    assert torch.isfinite(loss).all() and all(torch.isfinite(g).all() for g in grads)
    assert loss.shape == ref_loss.shape
    assert rel_err(loss, ref_loss) < tol, (loss, ref_loss)
    for g, rg in zip(grads, ref_grads):
        assert rel_err(g, rg) < tol
    if kwargs["mask"] is not None:  # padded rows pass no gradient through their own row (only as columns)
        out = relation_kl(*inputs, **kwargs, reduction="none", backend=backend, **op_kwargs)
        assert (out.detach()[(kwargs["mask"] == 0)[:, None, :].expand_as(out)] == 0).all()
    return loss, ref_loss


@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
@pytest.mark.parametrize("case", list(CASES))
def test_torch_float64_exact(case, reduction):
    check("torch", case, torch.float64, reduction, 1e-9, seed=zlib.crc32(f"{case}{reduction}".encode()) % 1000)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_torch_low_precision(dtype, tol):
    check("torch", "gqa-right-pad-segments", dtype, "sum", tol, seed=3)


def test_fully_padded_batch_is_zero_without_nan():
    inputs, kwargs = make_inputs(CASES["gqa-right-pad-segments"], torch.float64, 0)
    kwargs["mask"] = torch.zeros(2, 37, dtype=torch.bool)
    for reduction in ("sum", "mean"):
        loss = relation_kl(*inputs, **kwargs, reduction=reduction, backend="torch")
        loss.backward()
        assert loss.item() == 0.0
        assert all((x.grad == 0).all() for x in leaves(inputs))


def test_teacher_gets_no_gradient():
    inputs, kwargs = make_inputs(CASES["t1"], torch.float64, 1)
    t_rows = inputs[2].clone().requires_grad_(True)
    relation_kl(inputs[0], inputs[1], t_rows, t_rows, backend="torch").backward()
    assert t_rows.grad is None


TRITON_CASES = ["gqa-right-pad-segments", "t1", "holes-int-mask-segments-noncausal", "both-ends-causal"]


@pytest.mark.parametrize("case", TRITON_CASES)
def test_triton_float32_exact(case):
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs CUDA or TRITON_INTERPRET=1")
    check("triton", case, torch.float32, "sum" if case != "t1" else "mean", 1e-4, seed=11)


def test_triton_reduction_none_matches():
    check("triton", "noncausal-left-pad-full-pad-seq", torch.float32, "none", 1e-4, seed=5)


NON_FINITE_BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.skipif(
    not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1", reason="needs CUDA or the interpreter"))]


@pytest.mark.parametrize("backend", NON_FINITE_BACKENDS)
@pytest.mark.parametrize("tensor, value", [("t_rows", float("nan")), ("t_rows", float("inf")),
                                           ("t_rows", float("-inf")), ("t_cols", float("nan"))])
def test_non_finite_teacher_input_gives_a_nan_loss(backend, tensor, value):
    """A NaN or ±inf the op reads in the teacher's tensors makes the loss NaN on both backends (not a finite
    number with those rows dropped): exactly the rows the dense reference makes NaN, the others unchanged."""
    inputs, kwargs = make_inputs(CASES["gqa-right-pad-segments"], torch.float32, 2)
    index = 2 if tensor == "t_rows" else 3
    poisoned = inputs[index].clone()
    poisoned[1, 0, 10, 3] = value  # batch 1 is not padded: a row (t_rows) or a column (t_cols) the op reads
    inputs = (*inputs[:index], poisoned, *inputs[index + 1:])
    rows = relation_kl(*inputs, **kwargs, reduction="none", backend=backend).detach().double()
    ref = relation_kl_dense(*(x.detach().double() for x in inputs), **kwargs, reduction="none")
    assert ref.isnan().any() and torch.equal(rows.isnan(), ref.isnan())
    assert torch.allclose(rows[~ref.isnan()], ref[~ref.isnan()], rtol=1e-4, atol=1e-5)
    loss = relation_kl(*inputs, **kwargs, backend=backend)
    loss.backward()
    assert loss.isnan() and not torch.isfinite(inputs[0].grad).all()


@pytest.mark.parametrize("backend", NON_FINITE_BACKENDS)
def test_non_finite_teacher_input_where_the_mask_is_off_is_not_read(backend):
    inputs, kwargs = make_inputs(CASES["gqa-right-pad-segments"], torch.float32, 2)
    t_rows, t_cols = inputs[2].clone(), inputs[3].clone()
    t_rows[0, :, 30], t_cols[0, :, 30] = float("nan"), float("inf")  # batch 0's padding starts at 25
    inputs = (*inputs[:2], t_rows, t_cols)
    loss = relation_kl(*inputs, **kwargs, backend=backend).double()
    ref = relation_kl_dense(*(x.detach().double() for x in inputs), **kwargs)
    assert torch.isfinite(loss) and rel_err(loss.detach(), ref) < 1e-4


def random_case(seed):
    """A random case: shapes, GQA factors, causal, padding, segments, scales and self-relation all drawn."""
    g = torch.Generator().manual_seed(seed)

    def pick(*options):
        return options[int(torch.randint(len(options), (1,), generator=g))]

    self_rel = pick(False, True)
    H = pick(2, 4, 6)
    Hc = H if self_rel else pick(*(d for d in range(1, H + 1) if H % d == 0))
    Hct = H if self_rel else pick(*(d for d in range(1, H + 1) if H % d == 0))
    return (pick(1, 2), H, Hc, Hct, int(torch.randint(2, 50, (1,), generator=g)), pick(8, 12, 16, 24),
            pick(8, 20, 32), pick(True, False), pick(None, "right", "both", "holes"), pick(False, True),
            pick((None, None), (0.4, 0.3)), self_rel)


DETERMINISTIC_CASES = ["gqa-right-pad-segments", "self-relation-odd-t", "holes-int-mask-segments-noncausal", "t1",
                       "noncausal-left-pad-full-pad-seq", "both-ends-causal"]


@pytest.mark.parametrize("case", DETERMINISTIC_CASES + [f"random-{seed}" for seed in range(3)])
def test_triton_deterministic_float32_exact(case):
    """The atomic-free backward (row-parallel dQ, dK summed over GQA heads in one program) vs float64."""
    shape = random_case(int(case.split("-")[1])) if case.startswith("random-") else case
    reduction = ("sum", "mean", "none")[zlib.crc32(case.encode()) % 3]
    check("triton", shape, torch.float32, reduction, 1e-4, seed=13, deterministic=True)


@pytest.mark.parametrize("case", ["gqa-right-pad-segments", "both-ends-causal"])
def test_triton_deterministic_grads_are_bit_identical(case):
    """Two deterministic backward passes give the same bits (GQA, and a self-relation's summed dQ + dK).
    The buffers start uninitialised (torch.empty): an element no program writes would differ between runs."""
    inputs, kwargs = make_inputs(CASES[case], torch.float32, 17)
    runs = [loss_and_grads(lambda *a, **k: relation_kl(*a, **k, backend="triton", deterministic=True), inputs,
                           kwargs, "none", 17) for _ in range(2)]
    (loss_a, grads_a), (loss_b, grads_b) = runs
    assert torch.equal(loss_a, loss_b)
    assert all(torch.equal(a, b) and torch.isfinite(a).all() for a, b in zip(grads_a, grads_b))


@pytest.mark.parametrize("group", [1, 3])
@pytest.mark.parametrize("deterministic", [False, True])
def test_triton_head_groups_visit_every_tile(monkeypatch, group, deterministic):
    """Launch order by head groups (`_tile_and_head`): groups of 1 and of 3 of 8 row heads (and of 4 column
    heads in the deterministic dK pass), so the last group is short; every output is written once."""
    from linearard.kernels import relation_kl_triton

    monkeypatch.setattr(relation_kl_triton, "_head_group", lambda *args: group)
    check("triton", "gqa-right-pad-segments", torch.float32, "none", 1e-4, seed=19, deterministic=deterministic)


MEMORY_SCRIPT = textwrap.dedent("""
    import resource, sys, torch
    torch.set_num_threads(2)
    from linearard.kernels import relation_kl

    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()

    def peak_rss():  # VmHWM: the peak since the last reset (kB)
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))

    B, H, T, D = 1, 4, 16384, 64
    g = torch.Generator().manual_seed(0)
    w = torch.randn(1, 4, 300, 64, generator=g, requires_grad=True)  # warm-up: lazy library buffers
    relation_kl(w, w, w.detach(), w.detach(), backend="torch").backward()
    x = [torch.randn(B, H, T, D, generator=g) for _ in range(4)]
    x[0].requires_grad_(True); x[1].requires_grad_(True)
    inputs = sum(t.numel() * t.element_size() for t in x)
    before = rss()
    with open("/proc/self/clear_refs", "w") as f:  # reset the peak: imports and warm-up do not count
        f.write("5")
    loss = relation_kl(*x, backend="torch")
    loss.backward()
    peak = peak_rss()
    print(inputs, before, peak, loss.item())
""")


def test_torch_memory_is_linear():
    """Peak RSS of fwd+bwd at T=16384, H=4, D=64 (inputs included) < 2× the inputs; a T×T map is 4 GiB.

    Run in a fresh process with glibc's mmap threshold low, so freed tiles go back to the system at once and
    the peak RSS is the peak of live tensors (plus the interpreter and libtorch, measured before the inputs).
    """
    # A clean environment: variables other tests leave behind (the Triton interpreter, Ray's, allocator
    # settings) would change what the process allocates besides the op.
    env = {"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", "/tmp"),
           "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "2"}
    out = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT], env=env, capture_output=True, text=True,
                         check=True).stdout.split()
    inputs, before, peak, loss = int(out[0]), int(out[1]), int(out[2]), float(out[3])
    base = before - inputs  # RSS of the process before it made the inputs
    assert loss > 0
    print(f"peak {(peak - base) / 2**20:.0f} MiB, inputs {inputs / 2**20:.0f} MiB")
    assert peak - base < 2 * inputs, f"peak {(peak - base) / 2**20:.0f} MiB vs inputs {inputs / 2**20:.0f} MiB"


def _good():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(2, 4, 8, 16, generator=g), torch.randn(2, 2, 8, 16, generator=g),
            torch.randn(2, 4, 8, 12, generator=g), torch.randn(2, 1, 8, 12, generator=g)]


@pytest.mark.parametrize("change,kwargs,match", [
    ({0: torch.randn(4, 8, 16)}, {}, r"s_rows must have rank 4 .*\(4, 8, 16\)"),
    ({1: torch.randn(2, 3, 8, 16)}, {}, r"s_cols heads \(3\) must divide the row heads H=4"),
    ({1: torch.randn(2, 2, 9, 16)}, {}, r"s_cols must be \[B, Hc, T, Ds\].*\(2, 2, 9, 16\)"),
    ({2: torch.randn(2, 4, 7, 12)}, {}, r"t_rows must be \[B, H, T, Dt\].*\(2, 4, 7, 12\)"),
    ({3: torch.randn(2, 1, 8, 10)}, {}, r"t_cols must be .*\(2, 1, 8, 10\)"),
    ({3: torch.randn(2, 3, 8, 12)}, {}, r"t_cols heads \(3\) must divide"),
    ({2: torch.randn(2, 4, 8, 12, dtype=torch.float64)}, {}, r"share one dtype"),
    ({0: torch.randn(2, 4, 8, 16).to(torch.int32)}, {}, r"s_rows must be float64/float32"),
    ({0: torch.randn(2, 4, 8, 16, device="meta")}, {}, r"share one device"),
    ({0: torch.randn(2, 4, 0, 16), 1: torch.randn(2, 2, 0, 16), 2: torch.randn(2, 4, 0, 12),
      3: torch.randn(2, 1, 0, 12)}, {}, r"non-empty"),
    ({}, {"mask": torch.ones(2, 9, dtype=torch.bool)}, r"mask must be \[B, T\] = \(2, 8\), got shape \(2, 9\)"),
    ({}, {"mask": torch.ones(2, 8)}, r"mask must be bool or integer, got torch.float32"),
    ({}, {"segment_ids": torch.zeros(8, dtype=torch.long)}, r"segment_ids must be \[B, T\]"),
    ({}, {"segment_ids": torch.zeros(2, 8, dtype=torch.bool)}, r"segment_ids must be integer"),
    ({}, {"reduction": "avg"}, r"reduction must be 'sum', 'mean' or 'none', got 'avg'"),
    ({}, {"backend": "cuda"}, r"backend must be 'auto', 'torch' or 'triton', got 'cuda'"),
    ({}, {"scale_s": float("nan")}, r"scale_s must be a finite number"),
    ({}, {"causal": 1}, r"causal must be a bool"),
    ({}, {"deterministic": None}, r"deterministic must be a bool, got None"),
])
def test_bad_input_raises_one_line_value_error(change, kwargs, match):
    args = _good()
    for i, x in change.items():
        args[i] = x
    with pytest.raises(ValueError, match=match) as info:
        relation_kl(*args, **kwargs)
    assert "\n" not in str(info.value)


def test_triton_on_cpu_without_interpreter_raises(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match=r"backend='triton' needs CUDA tensors"):
        relation_kl(*_good(), backend="triton")
