"""relation_kl on CUDA against the dense float64 reference: bf16 (< 1e-2) and fp32 (< 1e-4) for the Triton
kernels, bf16 for the torch backend. Skipped without CUDA; benchmarks/relation_kl.py runs larger shapes."""

from __future__ import annotations

import pytest
import torch

from linearard.kernels import relation_kl
from test_relation_kl import CASES, check, make_inputs

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_bf16_matches_float64_reference(case, backend):
    check(backend, case, torch.bfloat16, "sum", 1e-2, seed=7, device="cuda")


@pytest.mark.parametrize("case", list(CASES))
def test_triton_fp32_matches_float64_reference(case):
    check("triton", case, torch.float32, "none", 1e-4, seed=8, device="cuda")


def test_auto_backend_on_cuda_is_finite_and_repeatable():
    inputs, kwargs = make_inputs(CASES["gqa-right-pad-segments"], torch.bfloat16, 1, "cuda")
    losses = torch.stack([relation_kl(*inputs, **kwargs) for _ in range(3)])
    assert torch.isfinite(losses).all() and (losses == losses[0]).all()
