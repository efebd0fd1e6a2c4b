"""Rope spec strings -> rope_parameters, and the student's rotary frequencies built by transformers from them."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from linearard.rope import RopeSpecError, parse_rope_spec, scaled_config


def test_parse_specs(tmp_path):
    assert parse_rope_spec("linear:8") == {"rope_type": "linear", "factor": 8.0}
    assert parse_rope_spec("dynamic:4") == {"rope_type": "dynamic", "factor": 4.0}
    assert parse_rope_spec("yarn:4,beta_fast=32,beta_slow=1") == {
        "rope_type": "yarn", "factor": 4.0, "beta_fast": 32, "beta_slow": 1}
    assert parse_rope_spec("llama3:8")["rope_type"] == "llama3"
    assert parse_rope_spec("native") == {"rope_type": "native"}
    path = tmp_path / "lr.json"
    path.write_text(json.dumps({"short_factor": [1.0] * 4, "long_factor": [2.0] * 4, "factor": 4}))
    assert parse_rope_spec(f"longrope:{path}")["long_factor"] == [2.0] * 4


@pytest.mark.parametrize("spec, words", [
    ("linear", "expected one of"), ("pi:4", "expected one of"), ("linear:x", "not a number"),
    ("linear:1", "factor must be a finite number > 1"), ("yarn:0.5", "factor must be a finite number > 1"),
    ("linear:inf", "factor must be a finite number > 1"), ("yarn:4,alpha=2", "unknown option"),
    ("yarn:4,beta_fast=x", "beta_fast must be a finite number"), ("yarn:4,truncate=3", "truncate must be true or false"),
    ("longrope:/no/such.json", "cannot read"),
])
def test_bad_specs(spec, words):
    with pytest.raises(RopeSpecError, match=words) as err:
        parse_rope_spec(spec)
    assert "\n" not in str(err.value)


def test_student_configs_and_frequencies(tiny_model, tmp_path):
    path = tiny_model("llama")
    teacher = AutoConfig.from_pretrained(path)
    native = teacher.max_position_embeddings

    linear = scaled_config(teacher, parse_rope_spec("linear:4"))
    assert linear.rope_parameters == {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0}
    assert linear.max_position_embeddings == 4 * native
    assert teacher.rope_parameters["rope_type"] == "default"  # the teacher's config is untouched

    yarn = scaled_config(teacher, parse_rope_spec("yarn:4,beta_fast=16")).rope_parameters
    assert yarn["original_max_position_embeddings"] == native and yarn["beta_fast"] == 16
    llama3 = scaled_config(teacher, parse_rope_spec("llama3:8")).rope_parameters
    assert (llama3["low_freq_factor"], llama3["high_freq_factor"]) == (1.0, 4.0)
    dynamic = scaled_config(teacher, parse_rope_spec("dynamic:4"))
    assert dynamic.max_position_embeddings == native  # dynamic NTK scales beyond max_position_embeddings
    lr_file = tmp_path / "longrope.json"
    lr_file.write_text(json.dumps({"short_factor": [1.0] * 4, "long_factor": [3.0] * 4, "factor": 4.0}))
    longrope = scaled_config(teacher, parse_rope_spec(f"longrope:{lr_file}"))
    assert longrope.rope_parameters["original_max_position_embeddings"] == native

    # transformers' own RoPE code computes the frequencies: PI divides them by the factor
    t_model = AutoModelForCausalLM.from_pretrained(path)
    s_model = AutoModelForCausalLM.from_pretrained(path, config=linear)
    torch.testing.assert_close(s_model.model.rotary_emb.inv_freq, t_model.model.rotary_emb.inv_freq / 4)
