"""Thin Ray jobs around the ``linearard`` library: Ray Data, Ray Train (FSDP2), MLflow, entrypoints.

``linearard.kernels`` lives in the top-level ``kernels/`` folder and is mapped into the package by the
install (pyproject's ``package-dir``). A job sent with ``ray job submit --working-dir .`` runs from an
uninstalled copy of the repository whose ``linearard/`` comes first on ``sys.path``; the finder below maps
``linearard.kernels`` to the ``kernels/`` folder beside whichever ``linearard`` was imported, so the job uses
the op of the same copy, installed or not. An installed wheel (``linearard/kernels/`` inside the package)
is left alone.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from pathlib import Path


class _SiblingKernelsFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):  # noqa: D102 - importlib protocol
        if fullname != "linearard.kernels" or not path:
            return None
        package_dir = Path(next(iter(path)))
        if (package_dir / "kernels" / "__init__.py").exists():
            return None  # a regular install: the normal import finds it
        kernels = package_dir.parent / "kernels"
        if not (kernels / "__init__.py").exists():
            return None
        return importlib.util.spec_from_file_location(
            fullname, kernels / "__init__.py", submodule_search_locations=[str(kernels)]
        )


if not any(isinstance(f, _SiblingKernelsFinder) for f in sys.meta_path):
    sys.meta_path.insert(0, _SiblingKernelsFinder())
