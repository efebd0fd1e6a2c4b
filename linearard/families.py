"""Which transformers model families LinearARD supports, decided from the config alone (no weights load).

``resolve_family(config, trainable, target_modules)`` is called on the driver before anything starts. For a
supported family it returns a ``Family``: the layers whose softmax attention the tap sees (a hybrid model's
linear-attention layers are skipped and said so), the modules LoRA (or ``trainable: qkv``) must target so that
Q, K and V each have trainable weights behind them, and what is special about the family. Anything else is
refused with one ``ConfigError`` line that names the model type and why.

Supported means tested: every family in ``SUPPORTED`` is in the test matrix (tests/linearard/test_families.py:
exact relation loss, packed = each document alone, the teacher under the tap is the model, training lowers the
loss, the merged checkpoint reloads). docs/families.md is the table, written by scripts/families_table.py.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PretrainedConfig
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from linearard.capture import wrapped_implementation
from linearard.config import ConfigError

RELATIONS = ("q", "k", "v")
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj")  # LoraConfig's default: resolved per family when left as is

# The modules whose weights produce Q, K and V, per projection layout.
_LAYOUTS: dict[str, dict[str, tuple[str, ...]]] = {
    "separate": {"q": ("q_proj",), "k": ("k_proj",), "v": ("v_proj",)},
    "qkv_proj": {r: ("qkv_proj",) for r in RELATIONS},  # Phi-3: one fused projection
    "query_key_value": {r: ("query_key_value",) for r in RELATIONS},  # GPT-NeoX, Persimmon
    # MLA: K's rotary part and both latents come from kv_a_proj_with_mqa, K's other part and V from kv_b_proj
    "mla": {"q": ("q_proj",), "k": ("kv_a_proj_with_mqa", "kv_b_proj"), "v": ("kv_a_proj_with_mqa", "kv_b_proj")},
}
_LAYOUT_NOTES = {"qkv_proj": "fused qkv_proj", "query_key_value": "fused query_key_value",
                 "mla": "MLA: LoRA on the q and kv_a/kv_b projections"}

# Layer types whose softmax attention calls transformers' attention interface (the tap sees them).
ATTENTION_LAYER_TYPES = frozenset({"full_attention", "sliding_attention", "chunked_attention"})
# Layer types without softmax attention: nothing to distil there, so their layers are skipped.
SKIPPED_LAYER_TYPES = {"linear_attention": "linear-attention", "conv": "convolution", "mamba": "Mamba"}

# Families whose forward builds its masks without position_ids, so transformers cannot find packed documents.
_NO_PACKING = "its forward builds the attention masks without position_ids, so packed documents would see each other"


@dataclass(frozen=True)
class _Support:
    layout: str = "separate"  # key of _LAYOUTS
    packed_refusal: str = ""  # why data.mode=packed is refused ("" = packed documents are exact)
    note: str = ""  # what is special that the config does not say


_NOPE_GLOBAL = "full-attention layers have no RoPE"
_NOPE_GLOBAL_HYBRID = "full-attention layers have no RoPE when sliding layers exist"

SUPPORTED: dict[str, _Support] = {
    # q_proj / k_proj / v_proj, one or two attention layer types
    **{t: _Support() for t in (
        "apertus", "apertus1p5_text", "arcee", "aria_text", "beam", "bitnet", "cohere", "cwm", "doge", "dots1",
        "ernie4_5", "ernie4_5_moe", "exaone", "flex_olmo", "gemma", "gemma2", "gemma3_text", "glm", "glm4",
        "glm4_moe", "granite", "granite_swa", "granitemoe", "granitemoe_swa", "granitemoeshared", "helium",
        "hunyuan_v1_dense", "hunyuan_v1_moe", "hy_v3", "hyperclovax", "internlm3", "iquestcoder", "jais2", "laguna",
        "llama", "llama4_text", "mellum", "mimo_v2_flash", "minimax_m2", "ministral", "mistral", "mixtral",
        "nanochat", "nemotron", "olmo", "olmo2", "olmo3", "olmoe", "phi", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe",
        "sarvam_moe", "seed_oss", "smollm3", "solar_open", "stablelm", "starcoder2", "vaultgemma")},
    "cohere2": _Support(note=_NOPE_GLOBAL), "cohere2_moe": _Support(note=_NOPE_GLOBAL + " (unless force_rope)"),
    "afmoe": _Support(packed_refusal=_NO_PACKING, note=_NOPE_GLOBAL),
    "exaone4": _Support(note=_NOPE_GLOBAL_HYBRID), "exaone_moe": _Support(note=_NOPE_GLOBAL_HYBRID),
    "kolibri1": _Support(note=_NOPE_GLOBAL_HYBRID),
    "gpt_oss": _Support(packed_refusal=_NO_PACKING, note="attention sinks"),
    # hybrid: the linear-attention / convolution layers are skipped
    "lfm2": _Support(), "minimax": _Support(), "olmo_hybrid": _Support(), "qwen3_5_text": _Support(),
    "qwen3_next": _Support(note="gated attention"),
    # fused projections
    "phi3": _Support("qkv_proj", note="student RoPE: longrope only (Phi3Config accepts no other)"),
    "gpt_neox": _Support("query_key_value"), "persimmon": _Support("query_key_value"),
    # multi-head latent attention
    **{t: _Support("mla") for t in ("axk1", "deepseek_v2", "deepseek_v3", "glm4_moe_lite", "longcat_flash", "minicpm3",
                                     "sarvam_mla", "youtu")},
}

# Multimodal checkpoints whose text model is a supported family (model_type -> its text model_type). Their
# causal-LM class either wraps the whole model (Gemma 3: the vision tower stays, frozen; text batches never run
# it) or is the text model alone (Llama 4: the merged checkpoint is text-only).
MULTIMODAL = {"gemma3": "gemma3_text", "llama4": "llama4_text"}
TEXT_MODULE = "language_model"  # the text model's module name inside a whole multimodal model

# Families with RoPE and a causal-LM class that are refused for a reason of their own.
REFUSED: dict[str, str] = {
    "falcon": "its attention classes are picked per implementation and never call transformers' attention "
              "interface, so the tap cannot see Q/K/V",
    "jetmoe": "mixture-of-attention: each token routes its query heads to experts, so a head's Q·Qᵀ compares "
              "different projections",
    "diffllama": "differential attention: each head subtracts two softmax maps, which one relation per head "
                 "does not describe",
    "phimoe": "its config accepts only LongRoPE with short_mscale/long_mscale, which a longrope spec does not carry",
}


@dataclass(frozen=True)
class Family:
    """What LinearARD needs to know about a supported model family (from its config).

    ``relation_modules`` pairs each relation (q, k, v) with the attention-module children whose weights
    produce it; ``feeders(r)`` reads it. ``packed_refusal`` says why packed batches are not exact ("" if they
    are). ``text_module``: for a multimodal model, the module holding its text model (targets are matched
    there only, so the vision tower gets no LoRA); "" otherwise.
    """

    model_type: str
    attention_layers: tuple[int, ...]
    skipped_layers: tuple[int, ...]
    skip_reason: str
    lora_targets: tuple[str, ...]
    relation_modules: tuple[tuple[str, tuple[str, ...]], ...]
    notes: tuple[str, ...]
    packed_refusal: str
    text_module: str

    def feeders(self, relation: str) -> tuple[str, ...]:
        """The attention-module children whose weights produce ``relation`` ("q", "k" or "v")."""
        return dict(self.relation_modules)[relation]

    def describe(self) -> str:
        """One line for the run's log: how many layers are distilled, the targets, and the notes (skipped layers
        and why among them)."""
        layers = len(self.attention_layers) + len(self.skipped_layers)
        return "; ".join([f"{self.model_type}: {len(self.attention_layers)} of {layers} layers distilled",
                          f"targets {', '.join(self.lora_targets)}", *self.notes])


def resolve_family(config: PretrainedConfig, trainable: str, target_modules: list[str] | None,
                   packed: bool = False) -> Family:
    """The ``Family`` of a teacher config, or ``ConfigError`` (one line) naming its model type and why not.

    ``trainable``: lora | qkv | full. ``target_modules``: the configured LoRA targets; None or the default
    ``["q_proj", "k_proj", "v_proj"]`` means the family's own (``Family.lora_targets``), anything else is kept
    and must put trainable weights behind each of Q, K and V. ``packed``: the run packs documents
    (``data.mode: packed``); refused for families where that is not exact.
    """
    model_type = config.model_type
    multimodal = model_type in MULTIMODAL and config.get_text_config().model_type == MULTIMODAL[model_type]
    support = SUPPORTED.get(MULTIMODAL[model_type] if multimodal else model_type)
    if support is None:
        raise ConfigError(f"model_type {model_type!r} is not supported: {_refusal(config)}")
    text = config.get_text_config()
    layer_types = list(getattr(text, "layer_types", None) or ["full_attention"] * text.num_hidden_layers)
    if _unknown_layer_types(layer_types):
        raise ConfigError(f"model_type {model_type!r} is not supported: {_unknown_layer_types(layer_types)}")
    attention = tuple(i for i, t in enumerate(layer_types) if t in ATTENTION_LAYER_TYPES)
    skipped = tuple(i for i, t in enumerate(layer_types) if t not in ATTENTION_LAYER_TYPES)
    if not attention:
        raise ConfigError(f"model_type {model_type!r}: no layer has softmax attention (layer types "
                          f"{sorted(set(layer_types))}), so there is nothing to distil")
    skip_kinds = sorted({SKIPPED_LAYER_TYPES[layer_types[i]] for i in skipped})
    skip_reason = f"{'/'.join(skip_kinds)} layers: no softmax attention" if skipped else ""

    relations = dict(_LAYOUTS[support.layout])
    if support.layout == "mla" and getattr(text, "q_lora_rank", None):  # Q through a low-rank pair
        relations["q"] = ("q_a_proj", "q_b_proj")
    family_targets = tuple(dict.fromkeys(name for r in RELATIONS for name in relations[r]))
    if target_modules is None or tuple(target_modules) == DEFAULT_TARGETS:
        targets = family_targets
    else:
        targets = tuple(target_modules)
        if trainable in ("lora", "qkv"):
            for r in RELATIONS:
                if not set(relations[r]) & set(targets):
                    raise ConfigError(f"lora.target_modules {list(targets)} put no trainable weights behind "
                                      f"{r.upper()} in {model_type!r} (it comes from {list(relations[r])}; the "
                                      f"family's targets are {list(family_targets)})")

    # a whole multimodal model (its causal-LM class wraps the vision tower): targets inside its text model only
    whole = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type, "").endswith("ForConditionalGeneration")
    text_module = TEXT_MODULE if multimodal and whole else ""
    packed_refusal = support.packed_refusal or (
        f"its {'/'.join(skip_kinds)} layers carry state across documents" if skipped else "")
    if packed and packed_refusal:
        raise ConfigError(f"data.mode packed is not supported for model_type {model_type!r}: {packed_refusal}; "
                          "use data.mode per_document")
    return Family(model_type=model_type, attention_layers=attention, skipped_layers=skipped,
                  skip_reason=skip_reason, lora_targets=targets,
                  relation_modules=tuple((r, relations[r]) for r in RELATIONS),
                  notes=_notes(text, support, layer_types, skipped, skip_reason, multimodal, text_module),
                  packed_refusal=packed_refusal, text_module=text_module)


def _unknown_layer_types(layer_types: list[str]) -> str:
    """Why layer types that are neither tapped nor known to skip refuse a family ("" when there are none)."""
    unknown = sorted(set(layer_types) - ATTENTION_LAYER_TYPES - set(SKIPPED_LAYER_TYPES))
    return f"layer types {unknown} are neither softmax attention the tap sees nor layers known to skip" if unknown \
        else ""


def _refusal(config: PretrainedConfig) -> str:
    """Why an unsupported model type is refused."""
    model_type = config.model_type
    if model_type in REFUSED:
        return REFUSED[model_type]
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return "transformers has no causal-LM class for it"
    try:  # ambiguous for encoder-decoder audio models
        text = config.get_text_config()
    except ValueError:
        return "no single text model in its config"
    if not getattr(text, "rope_parameters", None):
        return "no rope_parameters (absolute, ALiBi or fixed rotary positions): there is no RoPE to extend"
    try:
        layer_types = list(getattr(text, "layer_types", None) or ())
    except ValueError:  # heterogeneous configs keep layer types per layer
        layer_types = []
    return _unknown_layer_types(layer_types) or "not among the families LinearARD tests (docs/families.md lists them)"


def _notes(text: PretrainedConfig, support: _Support, layer_types: list[str], skipped: tuple[int, ...],
           skip_reason: str, multimodal: bool, text_module: str) -> tuple[str, ...]:
    """What is special about this config, for the log and the docs table."""
    notes = []
    if text_module:
        notes.append(f"multimodal: its {text.model_type} text model is distilled, the vision tower stays frozen")
    elif multimodal:
        notes.append(f"multimodal: AutoModelForCausalLM loads its {text.model_type} text model alone (the merged "
                     "checkpoint is text-only)")
    window = getattr(text, "sliding_window", None)
    if window and "sliding_attention" in layer_types:
        notes.append(f"sliding-window layers (window {window})")
    elif window and getattr(text, "layer_types", None) is None:
        notes.append(f"sliding window {window}")
    if "chunked_attention" in layer_types:
        notes.append(f"chunked attention (chunk {text.attention_chunk_size})")
    no_rope = [i for i, use_rope in enumerate(getattr(text, "no_rope_layers", None) or []) if not use_rope]
    if no_rope:
        notes.append(f"NoPE layers {no_rope}" if len(no_rope) <= 4 else f"{len(no_rope)} NoPE layers")
    softcap = getattr(text, "attn_logit_softcapping", None)
    if softcap:
        notes.append(f"attention softcap {softcap}")
    if support.note:
        notes.append(support.note)
    if wrapped_implementation(text) == "eager":
        notes.append("eager attention (sdpa cannot honour it)")
    if support.layout in _LAYOUT_NOTES:
        notes.append(_LAYOUT_NOTES[support.layout])
    rope = text.rope_parameters or {}
    nested = text.nested_rope_parameter_keys(rope)
    if nested:
        notes.append(f"per-layer-type RoPE ({', '.join(nested)})")
    rope_dicts = [rope[k] for k in nested if rope[k]] if nested else [rope]
    scaled = sorted({p.get("rope_type", "default") for p in rope_dicts} - {"default"})
    if scaled:
        notes.append(f"teacher RoPE already scales ({', '.join(scaled)}): the spec extends it")
    partial = [p.get("partial_rotary_factor", 1.0) for p in rope_dicts]
    if partial and min(partial) < 1:
        notes.append(f"partial rotary {min(partial)}")
    if skipped:
        notes.append(f"{len(skipped)} of {len(layer_types)} layers skipped ({skip_reason})")
    return tuple(notes)
