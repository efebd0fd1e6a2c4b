"""Tiny random models of every supported family (``linearard.families.SUPPORTED`` and ``MULTIMODAL``).

Each is 2 layers (a hybrid 3), hidden 32, 4 query heads over 2 KV heads of size 8 (MLA: 4 heads of 4+4, GPT-NeoX style:
4 heads), vocab 64, native window 64, plain RoPE, with what makes its family special kept and scaled down: a
sliding window of 4 and both layer types, chunks of 4, softcapping, sinks, MoE with 4 experts, a hybrid
model's linear-attention layer between two attention layers (the first layer's input stays position-free).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

from tests.conftest import TINY_VOCAB, save_random_model
WINDOW = 64  # native max_position_embeddings

_BASE = dict(vocab_size=TINY_VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=8, max_position_embeddings=WINDOW, tie_word_embeddings=False,
             rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, pad_token_id=1, bos_token_id=1,
             eos_token_id=1)
_MOE = dict(num_experts=4, num_local_experts=4, num_experts_per_tok=2, moe_intermediate_size=16)
_SLIDING = dict(sliding_window=4, layer_types=["full_attention", "sliding_attention"])
_SLIDING_FIRST = dict(sliding_window=4, layer_types=["sliding_attention", "full_attention"])  # RoPE on sliding only
_MLA = dict(num_key_value_heads=4, head_dim=4, kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=4,
            qk_nope_head_dim=4, v_head_dim=8, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
            n_shared_experts=1, first_k_dense_replace=1, n_group=1, topk_group=1)
_MHA = dict(num_key_value_heads=4)
_PER_TYPE_ROPE = dict(rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
                                       "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}})
_SOFTCAP = dict(attn_logit_softcapping=5.0, final_logit_softcapping=10.0)
_HYBRID = dict(num_hidden_layers=3, layer_types=["full_attention", "linear_attention", "full_attention"],
               linear_num_key_heads=2, linear_num_value_heads=2, linear_key_head_dim=8, linear_value_head_dim=8,
               linear_conv_kernel_dim=2)

# model_type -> config overrides (on top of _BASE); a family not named here needs none
TINY: dict[str, dict] = {
    "afmoe": dict(_MOE, **_SLIDING_FIRST, num_shared_experts=1),
    "aria_text": _MOE,
    "axk1": dict(_MLA, q_lora_rank=8),
    "beam": dict(_SLIDING, **_PER_TYPE_ROPE),
    "cohere2": _SLIDING_FIRST, "cohere2_moe": dict(_MOE, **_SLIDING_FIRST),
    "cwm": _SLIDING,
    "deepseek_v2": _MLA, "deepseek_v3": dict(_MLA, q_lora_rank=8),
    "dots1": dict(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, n_shared_experts=1, n_group=1,
                  topk_group=1, first_k_dense_replace=1),
    "ernie4_5_moe": dict(moe_num_experts=4, moe_k=2, moe_intermediate_size=16, moe_num_shared_experts=1),
    "exaone4": _SLIDING_FIRST, "exaone_moe": dict(_MOE, **_SLIDING_FIRST),
    "flex_olmo": _MOE,
    "gemma2": dict(_SLIDING, **_SOFTCAP),
    "gemma3_text": dict(_SLIDING, **_PER_TYPE_ROPE),
    "glm4_moe": dict(_MOE, n_routed_experts=4, n_shared_experts=1, first_k_dense_replace=1, n_group=1, topk_group=1),
    "glm4_moe_lite": dict(_MLA, q_lora_rank=8),
    "gpt_neox": _MHA,
    "gpt_oss": dict(_SLIDING, num_local_experts=4, num_experts_per_tok=2),
    "granite_swa": _SLIDING, "granitemoe": _MOE, "granitemoe_swa": dict(_MOE, **_SLIDING),
    "granitemoeshared": dict(_MOE, shared_intermediate_size=16),
    "hunyuan_v1_moe": dict(num_experts=4, moe_topk=2),
    "hy_v3": dict(_MOE, num_shared_experts=1),
    "kolibri1": _SLIDING_FIRST,
    "laguna": dict(_MOE, **_SLIDING, **_PER_TYPE_ROPE, shared_expert_intermediate_size=16),
    "lfm2": dict(num_hidden_layers=3, layer_types=["full_attention", "conv", "full_attention"]),
    "llama4_text": dict(_MOE, attention_chunk_size=4, intermediate_size_mlp=64, no_rope_layers=[1, 0],
                        layer_types=["chunked_attention", "full_attention"]),
    "longcat_flash": dict(_MLA, q_lora_rank=8, n_routed_experts=4, moe_topk=2, zero_expert_num=2,
                          expert_ffn_hidden_size=16),
    "mellum": dict(_MOE, **_SLIDING, **_PER_TYPE_ROPE),
    "mimo_v2_flash": dict(_SLIDING, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, n_group=1,
                          topk_group=1, v_head_dim=8, rope_parameters={  # stated: its own default init assumes 0.334
                              t: {"rope_type": "default", "rope_theta": theta, "partial_rotary_factor": 0.5}
                              for t, theta in (("full_attention", 5e6), ("sliding_attention", 1e4))}),
    "minicpm3": dict(_MLA, q_lora_rank=8),
    "minimax": dict(_MOE, **_HYBRID, block_size=4),
    "minimax_m2": _MOE,
    "ministral": _SLIDING,
    "mistral": dict(sliding_window=4),
    "mixtral": dict(_MOE, sliding_window=None),
    "olmo3": dict(_SLIDING, **_PER_TYPE_ROPE),
    "olmo_hybrid": _HYBRID,
    "olmoe": _MOE,
    "persimmon": _MHA,
    "phi": dict(_MHA, partial_rotary_factor=0.5),
    "qwen2": dict(use_sliding_window=False), "qwen2_moe": dict(_MOE, shared_expert_intermediate_size=16),
    "qwen3": dict(use_sliding_window=False), "qwen3_moe": _MOE,
    "qwen3_5_text": _HYBRID,
    "qwen3_next": dict(_MOE, **_HYBRID, shared_expert_intermediate_size=16),
    "sarvam_mla": _MLA, "sarvam_moe": _MOE,
    "smollm3": dict(no_rope_layers=[1, 0]),
    "solar_open": dict(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, n_shared_experts=1,
                       n_group=1, topk_group=1),
    "starcoder2": dict(sliding_window=4),
    "vaultgemma": dict(_SLIDING, **_SOFTCAP),
    "youtu": dict(_MLA, q_lora_rank=8),
}


def student_rope(model_type: str, model_dir: Path) -> str:
    """The matrix's rope spec: PI ×4 (``linear:4``); for Phi-3, whose config takes LongRoPE only, the same
    frequencies as LongRoPE factors (written next to the model)."""
    if model_type != "phi3":
        return "linear:4"
    path = model_dir / "longrope.json"
    path.write_text(json.dumps({"short_factor": [4.0] * 4, "long_factor": [4.0] * 4, "factor": 4.0,
                                "attention_factor": 1.0}))
    return f"longrope:{path}"


# multimodal model_type -> (its vision config, its other overrides); its text config is the text family's tiny one
MULTIMODAL_TINY: dict[str, tuple[dict, dict]] = {
    "gemma3": (dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=16,
                    patch_size=8), dict(mm_tokens_per_image=4, boi_token_index=61, eoi_token_index=62,
                                        image_token_index=63)),
    "llama4": (dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=16,
                    patch_size=8, vision_output_dim=16, projector_input_dim=16, projector_output_dim=32),
               dict(image_token_index=63, boi_token_index=61, eoi_token_index=62)),
}


def tiny_config(model_type: str, **overrides):
    """The tiny config of a family (plain RoPE, theta from its overrides), with ``overrides`` on top."""
    from transformers import AutoConfig

    from linearard.families import MULTIMODAL

    if model_type in MULTIMODAL:
        vision, extra = MULTIMODAL_TINY[model_type]
        text = tiny_config(MULTIMODAL[model_type]).to_dict()
        return AutoConfig.for_model(model_type, text_config=text, vision_config=vision, tie_word_embeddings=False,
                                    **extra)
    # a copy: transformers completes rope_parameters in place
    return AutoConfig.for_model(model_type, **copy.deepcopy({**_BASE, **TINY.get(model_type, {}), **overrides}))


def build_family_model(model_type: str, out_dir: Path, seed: int = 0, **overrides) -> Path:
    """Save a random tiny causal LM of ``model_type`` (config ``overrides`` on top of its tiny one) with a
    word-level tokenizer (words ``w2``..``w63``)."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    from linearard.families import MULTIMODAL

    torch.manual_seed(seed)
    # a multimodal family as its checkpoints are: the whole image-text model
    auto = AutoModelForImageTextToText if model_type in MULTIMODAL else AutoModelForCausalLM
    return save_random_model(auto.from_config(tiny_config(model_type, **overrides)), out_dir)
