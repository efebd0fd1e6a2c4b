"""Fixtures of tests/linearard: the bundled teacher, its tokenizer and its PI ×4 twin (evaluation, lm-eval), and the
family matrix's tiny random models (built once per session)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from linearard.rope import parse_rope_spec, scaled_config
from linearard.tiny import bundled_model_path
from tests.linearard.tiny_families import build_family_model


@pytest.fixture(scope="module")
def tokenizer():
    """The bundled models' byte-level tokenizer."""
    return AutoTokenizer.from_pretrained(bundled_model_path())


@pytest.fixture(scope="module")
def teacher():
    """The bundled teacher, fp32, eval mode."""
    return AutoModelForCausalLM.from_pretrained(bundled_model_path(), dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def scaled():
    """The bundled teacher's weights with RoPE ×4 (position interpolation, no training)."""
    config = scaled_config(AutoConfig.from_pretrained(bundled_model_path()), parse_rope_spec("linear:4"))
    return AutoModelForCausalLM.from_pretrained(bundled_model_path(), config=config, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def family_model(tmp_path_factory):
    """``family_model(model_type) -> Path`` of its saved tiny model (built once per session)."""
    built: dict[str, Path] = {}

    def get(model_type: str) -> Path:
        if model_type not in built:
            built[model_type] = build_family_model(model_type, tmp_path_factory.mktemp(f"family-{model_type}"))
        return built[model_type]

    return get
