"""scripts/build_tiny_model.py: it still runs, and rebuilds the shipped tokenizer and corpus files exactly."""

from __future__ import annotations

import gzip
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from linearard.tiny import bundled_corpus_records, bundled_model_path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "build_tiny_model.py"


@pytest.fixture(scope="module")
def build():
    spec = importlib.util.spec_from_file_location("build_tiny_model", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_script_rebuilds_the_same_tokenizer(build, tmp_path):
    build.build_tokenizer().save_pretrained(tmp_path)
    shipped = json.loads((bundled_model_path() / "tokenizer.json").read_text())
    assert json.loads((tmp_path / "tokenizer.json").read_text()) == shipped


def test_corpus_files_are_byte_reproducible(build, tmp_path):
    records = bundled_corpus_records("eval")[:3]
    build.write_jsonl_gz(records, tmp_path / "a.jsonl.gz")
    build.write_jsonl_gz(records, tmp_path / "b.jsonl.gz")
    assert (tmp_path / "a.jsonl.gz").read_bytes() == (tmp_path / "b.jsonl.gz").read_bytes()
    with gzip.open(tmp_path / "a.jsonl.gz", "rt") as f:
        assert [json.loads(line) for line in f] == records


def test_training_batches_are_deterministic_and_hold_passkey_rows(build):
    tokenizer = build.build_tokenizer()
    first = build.Batches(tokenizer, 256, 8, passkey_fraction=0.5, seed=3)
    second = build.Batches(tokenizer, 256, 8, passkey_fraction=0.5, seed=3)
    a, b = first.next(), second.next()
    assert a.shape == (8, 256) and torch.equal(a, b)
    texts = [tokenizer.decode(row) for row in a]
    assert any(t.startswith("The grass is green.") and "What is the pass key?" in t for t in texts)


def test_script_trains_saves_and_evaluates_on_cpu(build, tmp_path):
    build.main(["train", "--device", "cpu", "--steps", "2", "--batch-size", "2", "--eval-tokens", "512",
                "--passkey-trials", "1", "--out", str(tmp_path / "model")])
    info = json.loads((tmp_path / "model" / "build_info.json").read_text())
    assert info["device"] == "cpu" and info["args"]["steps"] == 2
    assert set(info["report"]["models"]) == {"teacher", "scaled"}
    assert set(info["report"]["models"]["teacher"]["ppl"]) == {"256", "512", "1024"}
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    assert model.config.max_position_embeddings == 256
