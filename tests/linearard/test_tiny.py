"""The bundled tiny model and corpus (``linearard.tiny``): what they are, and that they load offline."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from linearard.tiny import bundled_corpus, bundled_corpus_path, bundled_corpus_records, bundled_model_path


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


def test_bundled_corpus_has_held_out_files():
    train, held_out = bundled_corpus_records("train"), bundled_corpus_records("eval")
    assert len(train) > 300 and len(held_out) > 20
    assert not {r["source"] for r in train} & {r["source"] for r in held_out}
    assert any(r["source"].startswith("pydoc/") for r in train + held_out)
    assert sum(len(t) for t in bundled_corpus("eval")) > 200_000  # enough for 64 blocks of 4n = 1024
    assert bundled_corpus_path("train").stat().st_size < 4e6
    with pytest.raises(ValueError, match="unknown corpus split"):
        bundled_corpus("test")
