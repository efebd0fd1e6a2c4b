"""relation_kl on CUDA against the dense float64 reference: bf16 (< 1e-2) and fp32 (< 1e-4) for the Triton
kernels (both backward variants), bf16 for the torch backend. Skipped without CUDA; benchmarks/relation_kl.py
runs larger shapes."""

from __future__ import annotations

import pytest
import torch

from linearard.kernels import relation_kl
from tests.kernels.test_relation_kl import CASES, check, loss_and_grads, make_inputs

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

# backend, deterministic
VARIANTS = [("triton", False), ("triton", True), ("torch", False)]


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("backend,deterministic", VARIANTS)
def test_bf16_matches_float64_reference(case, backend, deterministic):
    check(backend, case, torch.bfloat16, "sum", 1e-2, seed=7, device="cuda", deterministic=deterministic)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("deterministic", [False, True])
def test_triton_fp32_matches_float64_reference(case, deterministic):
    check("triton", case, torch.float32, "none", 1e-4, seed=8, device="cuda", deterministic=deterministic)


def test_auto_backend_on_cuda_is_finite_and_repeatable():
    inputs, kwargs = make_inputs(CASES["gqa-right-pad-segments"], torch.bfloat16, 1, "cuda")
    losses = torch.stack([relation_kl(*inputs, **kwargs) for _ in range(3)])
    assert torch.isfinite(losses).all() and (losses == losses[0]).all()


# Large enough for many column programs to add into the same dQ rows (where atomics would reorder the sums).
BIG = {"gqa-mask-segments": (2, 8, 2, 4, 1500, 64, 64, True, "both", True, (None, None), False),
       "self-relation": (1, 8, 8, 8, 2048, 128, 128, True, None, False, (None, None), True)}


@pytest.mark.parametrize("case", list(BIG))
def test_deterministic_grads_are_bit_identical(case):
    inputs, kwargs = make_inputs(BIG[case], torch.bfloat16, 3, "cuda")
    fn = lambda *a, **k: relation_kl(*a, **k, backend="triton", deterministic=True)  # noqa: E731
    (loss, grads), *others = [loss_and_grads(fn, inputs, kwargs, "none", 3) for _ in range(3)]
    for other_loss, other_grads in others:
        assert torch.equal(loss, other_loss)
        assert all(torch.equal(a, b) for a, b in zip(grads, other_grads))
