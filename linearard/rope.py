"""RoPE spec string -> the student's ``rope_parameters`` (transformers' own RoPE code does all the math).

A spec names how the student's positions are scaled:

=====================  =====================================================================================
``linear:8``           position interpolation (PI), factor 8
``dynamic:4``          dynamic NTK; note it changes nothing at or below the native window, so ARD on short
                       text sees a student identical to the teacher (loss 0): it is an inference-time method
``yarn:4``             YaRN, optional extra keys after commas: ``yarn:4,beta_fast=32,beta_slow=1``
``llama3:8``           Llama 3 frequency-band scaling (``low_freq_factor=1``, ``high_freq_factor=4`` default)
``longrope:f.json``    LongRoPE with ``short_factor`` / ``long_factor`` lists (and optionally ``factor``,
                       ``attention_factor``, ``original_max_position_embeddings``) from a JSON file
``native``             keep the teacher's RoPE (a control run: the ARD loss is then exactly 0)
=====================  =====================================================================================

The spec extends the teacher's own RoPE (``student_rope``):

- a teacher with plain RoPE (``default``): the spec's type with the teacher's ``rope_theta`` (and
  ``partial_rotary_factor``); ``original_max_position_embeddings`` is the teacher's native window;
- a teacher whose RoPE already scales (Llama-3.1's ``llama3``, gpt-oss's ``yarn``, ``linear``): a spec of the
  same type multiplies the teacher's factor and keeps its other keys (bands, betas, theta, original window), so
  the teacher's frequencies stay the base; ``attention_factor`` follows the new factor unless the spec sets it;
- a LongRoPE teacher (Phi-3): ``longrope:<file.json>`` gives the student's factors, the original window stays;
- any other pair has no single ``rope_parameters`` that composes the two, and is refused (``RopeSpecError``);
- per-layer-type RoPE (Gemma3, OLMo3: a ``rope_parameters`` dict per layer type): each layer type's RoPE is
  extended as above, except ``sliding_attention``, which keeps the teacher's (a sliding layer never sees
  distances beyond its window, so there is nothing to extend).

The student's ``max_position_embeddings`` is the teacher's × the spec's factor (except for ``dynamic``, whose
scaling starts from ``max_position_embeddings`` and so must keep it, and LongRoPE, whose JSON sets it).
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

ROPE_TYPES = ("linear", "dynamic", "yarn", "llama3", "longrope")
NATIVE = "native"
# Extra keys each type accepts after the factor (transformers' validators name the same ones).
_EXTRA_KEYS = {
    "linear": set(),
    "dynamic": set(),
    "yarn": {"beta_fast", "beta_slow", "mscale", "mscale_all_dim", "attention_factor", "truncate"},
    "llama3": {"low_freq_factor", "high_freq_factor"},
}
_LONGROPE_KEYS = {"short_factor", "long_factor", "factor", "attention_factor", "original_max_position_embeddings",
                  "max_position_embeddings"}


class RopeSpecError(ValueError):
    """A rope spec string that cannot be understood (one line)."""


def _number(text: str) -> int | float | bool | str:
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def parse_rope_spec(spec: str) -> dict[str, Any]:
    """Parse a spec into ``{"rope_type": ..., "factor": ..., **extras}`` (``{"rope_type": "native"}`` for native).

    ``longrope:<file.json>`` reads the file. Raises ``RopeSpecError`` (one line) on anything malformed,
    including a factor that is not > 1.
    """
    spec = (spec or "").strip()
    if spec == NATIVE:
        return {"rope_type": NATIVE}
    rope_type, sep, rest = spec.partition(":")
    if rope_type not in ROPE_TYPES or not sep or not rest:
        raise RopeSpecError(f"bad rope spec {spec!r}: expected one of "
                            f"{', '.join(t + ':<factor>' for t in ROPE_TYPES[:-1])}, longrope:<file.json> or native")
    if rope_type == "longrope":
        path = Path(rest)
        try:
            params = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise RopeSpecError(f"bad rope spec {spec!r}: cannot read LongRoPE JSON {str(path)!r} "
                                f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})") from None
        if not isinstance(params, dict) or not {"short_factor", "long_factor"} <= set(params):
            raise RopeSpecError(f"bad rope spec {spec!r}: the JSON must be an object with short_factor and long_factor")
        unknown = set(params) - _LONGROPE_KEYS
        if unknown:
            raise RopeSpecError(f"bad rope spec {spec!r}: unknown LongRoPE keys {sorted(unknown)}")
        for key in sorted(set(params) & {"attention_factor", "original_max_position_embeddings",
                                         "max_position_embeddings"}):
            if not _positive(params[key]):
                raise RopeSpecError(f"bad rope spec {spec!r}: {key} must be a finite number > 0 (got {params[key]!r})")
        params = {"rope_type": "longrope", **params}
    else:
        factor_text, *extras = rest.split(",")
        factor = _number(factor_text.strip())
        if isinstance(factor, bool) or not isinstance(factor, (int, float)):
            raise RopeSpecError(f"bad rope spec {spec!r}: factor {factor_text!r} is not a number")
        params = {"rope_type": rope_type, "factor": float(factor)}
        for extra in extras:
            key, eq, value = extra.partition("=")
            key = key.strip()
            if not eq or key not in _EXTRA_KEYS[rope_type]:
                allowed = ", ".join(sorted(_EXTRA_KEYS[rope_type])) or "none"
                raise RopeSpecError(f"bad rope spec {spec!r}: unknown option {extra!r} for {rope_type} "
                                    f"(allowed: {allowed})")
            number = _number(value.strip())
            wanted = bool if key == "truncate" else (int, float)
            if not isinstance(number, wanted) or (wanted is not bool and (isinstance(number, bool)
                                                                          or not math.isfinite(number))):
                raise RopeSpecError(f"bad rope spec {spec!r}: {key} must be "
                                    f"{'true or false' if key == 'truncate' else 'a finite number'} (got {value!r})")
            params[key] = number
    factor = params.get("factor")
    if factor is not None and (isinstance(factor, bool) or not isinstance(factor, (int, float))
                               or not math.isfinite(factor) or factor <= 1):
        raise RopeSpecError(f"bad rope spec {spec!r}: factor must be a finite number > 1 (got {factor})")
    return params


# Layer types whose RoPE the student keeps: their attention never spans more than the window.
_WINDOWED_LAYER_TYPES = {"sliding_attention"}
# Scaled RoPE types a spec of the same type extends by multiplying the factor.
_FACTOR_TYPES = ("linear", "yarn", "llama3")
# Keys of a rope_parameters dict that the factor determines (transformers derives them when they are absent).
_DERIVED_KEYS = ("attention_factor",)


def _nested_layer_types(config: Any) -> list[str]:
    """The layer types a per-layer-type ``rope_parameters`` is keyed by ([] for one global dict)."""
    return config.nested_rope_parameter_keys(config.rope_parameters or {})


def _positive(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def native_window(config: Any) -> int:
    """The teacher's native context: the ``original_max_position_embeddings`` of its RoPE when that RoPE
    already scales, else its ``max_position_embeddings``. ``config`` may be a multimodal config (its text
    config is read)."""
    config = config.get_text_config()
    rope = config.rope_parameters or {}
    layer_types = _nested_layer_types(config)
    originals = [params["original_max_position_embeddings"]
                 for params in ([rope[t] for t in layer_types] if layer_types else [rope])
                 if params and params.get("rope_type", "default") != "default"
                 and params.get("original_max_position_embeddings")]
    return int(min(originals)) if originals else int(config.max_position_embeddings)


def _extend(teacher: dict[str, Any], parsed: dict[str, Any], window: int) -> dict[str, Any]:
    """One RoPE dict of the teacher extended by the parsed spec (see the module docstring)."""
    teacher_type, spec_type = teacher.get("rope_type", "default"), parsed["rope_type"]
    if teacher_type == "default":
        params = {k: v for k, v in teacher.items() if k in ("rope_theta", "partial_rotary_factor")}
        params.update(parsed)
        if spec_type in ("yarn", "llama3", "longrope"):
            params.setdefault("original_max_position_embeddings", window)
        if spec_type == "llama3":
            params.setdefault("low_freq_factor", 1.0)
            params.setdefault("high_freq_factor", 4.0)
            if not params["low_freq_factor"] < params["high_freq_factor"]:  # the band between them divides by the gap
                raise RopeSpecError(f"llama3 needs low_freq_factor < high_freq_factor (got "
                                    f"{params['low_freq_factor']} and {params['high_freq_factor']})")
        return params
    if teacher_type == spec_type and spec_type in _FACTOR_TYPES:
        params = {k: v for k, v in teacher.items() if k not in _DERIVED_KEYS}
        params.update(parsed)
        params["factor"] = float(teacher.get("factor", 1.0)) * parsed["factor"]
        return params
    if teacher_type == spec_type == "longrope":
        params = {k: v for k, v in teacher.items() if k not in ("short_factor", "long_factor", "factor",
                                                                  *_DERIVED_KEYS)}
        params.update(parsed)
        return params
    if teacher_type == "longrope":
        hint = "longrope:<file.json> with the student's factors"
    elif teacher_type in _FACTOR_TYPES:
        hint = f"{teacher_type}:<factor>, which multiplies the teacher's factor"
    else:
        hint = "native"
    raise RopeSpecError(f"{spec_type} cannot extend the teacher's {teacher_type} RoPE (no single transformers "
                        f"rope_parameters composes the two); use {hint}")


def student_rope(teacher_config: Any, parsed: dict[str, Any]) -> tuple[dict[str, Any], int]:
    """The student's ``(rope_parameters, max_position_embeddings)`` for a teacher config and a parsed spec
    (``parse_rope_spec``). A per-layer-type ``rope_parameters`` stays one dict per layer type.

    Raises ``RopeSpecError`` (one line) when the spec cannot extend the teacher's RoPE.
    """
    config = teacher_config.get_text_config()
    rope = copy.deepcopy(config.rope_parameters or {})
    max_positions = int(config.max_position_embeddings)
    spec_type = parsed["rope_type"]
    if spec_type == NATIVE:
        return rope, max_positions
    window = native_window(config)
    layer_types = _nested_layer_types(config)
    if layer_types:
        params = {t: (p if t in _WINDOWED_LAYER_TYPES or p is None else _extend(p, parsed, window))
                  for t, p in rope.items()}
        extended = [p for t, p in params.items() if p is not None and t not in _WINDOWED_LAYER_TYPES]
    else:
        params = _extend(rope, parsed, window)
        extended = [params]
    if spec_type == "dynamic":
        return params, max_positions
    if spec_type == "longrope":  # LongRoPE's factor is relative to its original window; the JSON may give either
        positions = parsed.get("max_position_embeddings")
        # One factor per rotated frequency: transformers only warns on a list of another length, then fails (or
        # scales the wrong frequencies) when the model is built.
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        for p in extended:
            frequencies = int(head_dim * p.get("partial_rotary_factor", 1.0)) // 2
            for key in ("short_factor", "long_factor"):
                values = p.get(key)
                if not isinstance(values, list) or len(values) != frequencies or not all(map(_positive, values)):
                    raise RopeSpecError(f"the LongRoPE {key} must be a list of {frequencies} finite numbers > 0 "
                                        f"(head size {head_dim} / 2), got {values!r:.60}")
            p.pop("max_position_embeddings", None)
            if "factor" not in p:
                if positions is None:
                    raise RopeSpecError("the LongRoPE JSON needs factor or max_position_embeddings")
                p["factor"] = positions / p["original_max_position_embeddings"]
            if p["factor"] <= 1:
                raise RopeSpecError(f"the LongRoPE factor must be > 1 (got {p['factor']})")
        first = extended[0]
        return params, int(positions or round(first["original_max_position_embeddings"] * first["factor"]))
    return params, int(round(max_positions * parsed["factor"]))


def scaled_config(teacher_config: Any, parsed: dict[str, Any]) -> Any:
    """A deep copy of ``teacher_config`` whose (text config's) RoPE follows the parsed spec (``parse_rope_spec``):
    a scaled model in one call. ``RopeSpecError`` (one line) when the spec cannot extend the teacher's RoPE or
    transformers rejects the result."""
    return with_rope(teacher_config, *student_rope(teacher_config, parsed))


def with_rope(config: Any, rope_parameters: dict[str, Any], max_positions: int) -> Any:
    """A deep copy of ``config`` whose (text config's) ``rope_parameters`` and ``max_position_embeddings`` are
    these, checked by transformers (``RopeSpecError``, one line, when it rejects them)."""
    config = copy.deepcopy(config)
    text_config = config.get_text_config()
    text_config.rope_parameters = copy.deepcopy(rope_parameters)
    text_config.max_position_embeddings = max_positions
    try:  # transformers' own check of the keys each rope type needs (and a family's own rules, e.g. Phi-3's)
        text_config.validate_rope()
    except (ValueError, TypeError, KeyError) as err:
        raise RopeSpecError(f"transformers rejects the student's rope_parameters for {text_config.model_type!r}: "
                            f"{str(err).strip().splitlines()[0]}") from None
    return config
