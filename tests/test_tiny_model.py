"""The bundled tiny model and corpus: what they are, that they load offline, and that the script that built
them still runs and is deterministic."""

from __future__ import annotations

import gzip
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from linearard.tiny import bundled_corpus, bundled_corpus_path, bundled_corpus_records, bundled_model_path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "build_tiny_model.py"


@pytest.fixture(scope="module")
def build():
    spec = importlib.util.spec_from_file_location("build_tiny_model", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bundled_model_is_a_small_gqa_llama_with_native_rope():
    path = bundled_model_path()
    config = AutoConfig.from_pretrained(path)
    assert config.model_type == "llama"
    assert (config.num_hidden_layers, config.hidden_size) == (4, 256)
    assert (config.num_attention_heads, config.num_key_value_heads) == (8, 2)
    assert config.max_position_embeddings == 256
    assert config.rope_parameters == {"rope_type": "default", "rope_theta": 10000.0}
    assert config.tie_word_embeddings and config.vocab_size == 259
    assert (path / "model.safetensors").stat().st_size < 8e6  # "a few MB"
    with safe_open(path / "model.safetensors", "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    model = AutoModelForCausalLM.from_pretrained(path)
    assert model.dtype == torch.float32  # the config asks for float32 compute over the bf16 weights
    assert 2.5e6 < sum(p.numel() for p in model.parameters()) < 3.5e6


def test_bundled_tokenizer_is_byte_level_and_loads_offline():
    tokenizer = AutoTokenizer.from_pretrained(bundled_model_path())
    text = "def f(x):\n    return 'héllo' \t# ü €\x00"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids == list(text.encode("utf-8"))
    assert tokenizer.decode(ids) == text
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (256, 257, 258)
    assert tokenizer("abc")["input_ids"] == [97, 98, 99]  # no BOS added by default


def test_script_rebuilds_the_same_tokenizer(build, tmp_path):
    build.build_tokenizer().save_pretrained(tmp_path)
    shipped = json.loads((bundled_model_path() / "tokenizer.json").read_text())
    assert json.loads((tmp_path / "tokenizer.json").read_text()) == shipped


def test_bundled_corpus_has_held_out_files():
    train, held_out = bundled_corpus_records("train"), bundled_corpus_records("eval")
    assert len(train) > 300 and len(held_out) > 20
    assert not {r["source"] for r in train} & {r["source"] for r in held_out}
    assert any(r["source"].startswith("pydoc/") for r in train + held_out)
    assert sum(len(t) for t in bundled_corpus("eval")) > 200_000  # enough for 64 blocks of 4n = 1024
    assert bundled_corpus_path("train").stat().st_size < 4e6
    with pytest.raises(ValueError, match="unknown corpus split"):
        bundled_corpus("test")


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
    assert set(info["report"]["ppl"]) == {"teacher", "scaled"}
    assert set(info["report"]["ppl"]["teacher"]) == {"256", "512", "1024"}
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    assert model.config.max_position_embeddings == 256
