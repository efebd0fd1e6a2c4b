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

``original_max_position_embeddings`` is the teacher's ``max_position_embeddings`` and ``rope_theta`` the
teacher's; the student's ``max_position_embeddings`` becomes native × factor (except for ``dynamic``, whose
scaling starts from ``max_position_embeddings`` and so must keep the native value).
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


def student_rope(teacher_config: Any, parsed: dict[str, Any]) -> tuple[dict[str, Any], int]:
    """The student's ``(rope_parameters, max_position_embeddings)`` for a teacher config and a parsed spec
    (``parse_rope_spec`` output).

    The teacher's ``rope_theta`` (and ``partial_rotary_factor``) carry over; the native window is the
    teacher's ``max_position_embeddings``.
    """
    native_params = dict(teacher_config.rope_parameters or {})
    native = native_window(teacher_config)
    if parsed["rope_type"] == NATIVE:
        return native_params, native
    params = {k: v for k, v in native_params.items() if k in ("rope_theta", "partial_rotary_factor")}
    params.update(parsed)
    rope_type = params["rope_type"]
    if rope_type in ("yarn", "llama3", "longrope"):
        params.setdefault("original_max_position_embeddings", native)
    if rope_type == "llama3":
        params.setdefault("low_freq_factor", 1.0)
        params.setdefault("high_freq_factor", 4.0)
        if not params["low_freq_factor"] < params["high_freq_factor"]:  # the band between them divides by the gap
            raise RopeSpecError(f"llama3 needs low_freq_factor < high_freq_factor (got {params['low_freq_factor']} "
                                f"and {params['high_freq_factor']})")
    if rope_type == "longrope":
        # One factor per rotated frequency: transformers only warns on a list of another length, then fails (or
        # scales the wrong frequencies) when the model is built.
        head_dim = getattr(teacher_config, "head_dim", None) or \
            teacher_config.hidden_size // teacher_config.num_attention_heads
        frequencies = int(head_dim * params.get("partial_rotary_factor", 1.0)) // 2
        for key in ("short_factor", "long_factor"):
            values = params[key]
            if not isinstance(values, list) or len(values) != frequencies or not all(map(_positive, values)):
                raise RopeSpecError(f"the LongRoPE {key} must be a list of {frequencies} finite numbers > 0 (head "
                                    f"size {head_dim} / 2), got {values!r:.60}")
        max_positions = params.pop("max_position_embeddings", None)
        if "factor" not in params:
            if max_positions is None:
                raise RopeSpecError("the LongRoPE JSON needs factor or max_position_embeddings")
            params["factor"] = max_positions / params["original_max_position_embeddings"]
        if params["factor"] <= 1:
            raise RopeSpecError(f"the LongRoPE factor must be > 1 (got {params['factor']})")
        return params, int(max_positions or round(params["original_max_position_embeddings"] * params["factor"]))
    if rope_type == "dynamic":
        return params, native
    return params, int(round(native * params["factor"]))


def _positive(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def native_window(config: Any) -> int:
    """A model's native context: the window its RoPE was trained at."""
    return int(config.max_position_embeddings)


def scaled_config(teacher_config: Any, spec: str) -> Any:
    """A deep copy of ``teacher_config`` whose ``rope_parameters`` and ``max_position_embeddings`` follow
    ``spec``, checked by transformers' own RoPE validation (a scaled model in one call: evaluation, scripts)."""
    rope_parameters, max_positions = student_rope(teacher_config, parse_rope_spec(spec))
    return with_rope(teacher_config, rope_parameters, max_positions)


def with_rope(config: Any, rope_parameters: dict[str, Any], max_positions: int) -> Any:
    """A deep copy of ``config`` with these ``rope_parameters`` and ``max_position_embeddings``."""
    config = copy.deepcopy(config)
    config.rope_parameters = copy.deepcopy(rope_parameters)
    config.max_position_embeddings = max_positions
    config.validate_rope()  # transformers' own check of the keys each rope type needs
    return config
