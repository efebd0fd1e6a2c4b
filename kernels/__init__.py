"""Linear-memory relation-KL op, imported as ``linearard.kernels`` (never as a bare ``kernels``).

For every row i of a relation map, KL(P_t(i,·) ‖ P_s(i,·)) between the teacher's and the student's row
softmax of scaled dot products, without ever storing the T×T maps. ``op.py`` is the public function (checks,
backend choice, reduction), ``relation_kl_torch.py`` the chunked PyTorch backend (any device),
``relation_kl_triton.py`` the Triton kernels (CUDA), ``reference.py`` the dense float64 reference the tests
and benchmarks compare against. docs/kernel.md has the math, the tiles and measured numbers.
"""

import sys as _sys

if __name__ == "linearard.kernels":
    from .op import relation_kl

    __all__ = ["relation_kl"]
else:
    # A bare ``import kernels`` found this folder: the repository root is on sys.path (``python -m`` from the
    # root, ``ray job submit --working-dir .``). That name belongs to Hugging Face's ``kernels`` package, which
    # transformers probes on import. Hand the import to it where it is installed; otherwise stay an empty
    # module without ``__file__``, which transformers reads as "not installed" (a namespace-package shadow).
    from importlib.machinery import PathFinder as _PathFinder
    from importlib.util import module_from_spec as _module_from_spec
    from pathlib import Path as _Path

    _root = _Path(__file__).resolve().parent.parent
    _spec = _PathFinder.find_spec(__name__, [p for p in _sys.path if _Path(p or ".").resolve() != _root])
    if _spec is not None and _spec.loader is not None:
        _module = _module_from_spec(_spec)
        _sys.modules[__name__] = _module
        _spec.loader.exec_module(_module)
    else:
        del __file__
    del _PathFinder, _module_from_spec, _Path, _root, _spec, _sys
