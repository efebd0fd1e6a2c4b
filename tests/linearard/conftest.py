"""The family matrix's fixture: each supported family's tiny random model, built once per session."""

from __future__ import annotations

from pathlib import Path

import pytest
from tests.linearard.tiny_families import build_family_model


@pytest.fixture(scope="session")
def family_model(tmp_path_factory):
    """``family_model(model_type) -> Path`` of its saved tiny model (built once per session)."""
    built: dict[str, Path] = {}

    def get(model_type: str) -> Path:
        if model_type not in built:
            built[model_type] = build_family_model(model_type, tmp_path_factory.mktemp(f"family-{model_type}"))
        return built[model_type]

    return get
