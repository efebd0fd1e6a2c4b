"""The "linearard" attention: it hands the tap post-RoPE Q/K and unrotated V, equals sdpa, and packs documents."""

from __future__ import annotations

import importlib

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from linearard.capture import attention_inputs, set_tap
from linearard.rope import parse_rope_spec, scaled_config

FAMILIES = ["llama", "mistral", "qwen2", "qwen3"]


def _load(path, config=None, attn="linearard"):
    model = AutoModelForCausalLM.from_pretrained(path, config=config, attn_implementation=attn)
    return model.eval()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("rope", ["native", "linear:4"])
def test_captured_qkv_match_manual_rope(tiny_model, family, rope):
    path = tiny_model(family)
    config = scaled_config(AutoConfig.from_pretrained(path), parse_rope_spec(rope))
    model = _load(path, config)
    captured, layer_inputs = {}, {}
    set_tap(model, lambda layer, q, k, v: captured.__setitem__(layer, (q, k, v)))
    for i, layer in enumerate(model.model.layers):
        layer.input_layernorm.register_forward_hook(lambda m, a, out, i=i: layer_inputs.__setitem__(i, out))
    ids = torch.randint(0, 64, (2, 11))
    with torch.no_grad():
        model(input_ids=ids)
        position_ids = torch.arange(11)[None].expand(2, -1)
        cos, sin = model.model.rotary_emb(layer_inputs[0], position_ids)
        apply_rotary_pos_emb = importlib.import_module(type(model).__module__).apply_rotary_pos_emb
        for i, layer in enumerate(model.model.layers):
            attn, h = layer.self_attn, layer_inputs[i]
            heads = lambda x: x.view(2, 11, -1, attn.head_dim).transpose(1, 2)  # noqa: E731
            q, k, v = heads(attn.q_proj(h)), heads(attn.k_proj(h)), heads(attn.v_proj(h))
            if hasattr(attn, "q_norm"):  # Qwen3 normalises q/k per head before RoPE
                q, k = attn.q_norm(q), attn.k_norm(k)
            q_rot, k_rot = apply_rotary_pos_emb(q, k, cos, sin)
            cq, ck, cv = captured[i]
            assert cq.shape == (2, 4, 11, 8) and ck.shape == cv.shape == (2, 2, 11, 8)  # GQA: K/V not repeated
            torch.testing.assert_close(cq, q_rot)
            torch.testing.assert_close(ck, k_rot)
            torch.testing.assert_close(cv, v)  # V is not rotated
            assert not torch.allclose(cq, q)  # RoPE really applied


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_same_logits_as_sdpa_with_padding(tiny_model, family):
    path = tiny_model(family)
    ids = torch.randint(0, 64, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 6:] = 0
    with torch.no_grad():
        ours = _load(path)(input_ids=ids, attention_mask=mask).logits
        ref = _load(path, attn="sdpa")(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(ours, ref)


def test_packed_documents_read_as_if_alone(tiny_model):
    model = _load(tiny_model("llama"))
    doc_a, doc_b = torch.randint(0, 64, (1, 5)), torch.randint(0, 64, (1, 7))
    packed = {"input_ids": torch.cat([doc_a, doc_b], 1), "segment_ids": torch.tensor([[0] * 5 + [1] * 7])}
    inputs = attention_inputs(packed)
    assert inputs["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 6]]
    with torch.no_grad():
        logits = model(**inputs).logits
        torch.testing.assert_close(logits[:, :5], model(input_ids=doc_a).logits)
        torch.testing.assert_close(logits[:, 5:], model(input_ids=doc_b).logits)


def test_padded_packed_rows_stay_finite(tiny_model):
    model = _load(tiny_model("llama"))
    batch = {"input_ids": torch.randint(0, 64, (2, 6)), "attention_mask": torch.tensor([[0, 0, 1, 1, 1, 1]] * 2),
             "segment_ids": torch.tensor([[0, 0, 0, 1, 1, 1]] * 2)}
    with torch.no_grad():
        assert torch.isfinite(model(**attention_inputs(batch)).logits).all()
