"""The student's RoPE extends the teacher's own: a teacher that already scales (Llama-3.1's llama3, gpt-oss's
yarn, Phi-3's longrope) keeps its native window and frequencies as the base, per-layer-type RoPE keeps every
layer type, and a pair no single rope_parameters composes is refused in one line (also by the run config).
Frequencies come from transformers' own rotary embeddings; scaled teachers also train and reload."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, Gemma3TextConfig, LlamaConfig, Phi3Config
from transformers.models.gemma3.modeling_gemma3 import Gemma3RotaryEmbedding
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from linearard.config import ConfigError, LoraConfig, RunConfig
from linearard.losses import DistillationLoss
from linearard.models import build_teacher_student, save_merged
from linearard.plan import resolve
from linearard.rope import RopeSpecError, native_window, parse_rope_spec, scaled_config, student_rope
from tests.conftest import plan_for, train_steps
from tests.linearard.tiny_families import build_family_model

_TINY = dict(hidden_size=64, num_attention_heads=1, head_dim=64, num_hidden_layers=2)


def _llama31():
    """Llama-3.1's RoPE scaled down: llama3 factor 8 from an original window of 256, reaching 2048."""
    return LlamaConfig(**_TINY, max_position_embeddings=2048, rope_parameters={
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 256})


def _gpt_oss_like():
    """gpt-oss's RoPE scaled down: yarn factor 32 from an original window of 64."""
    return LlamaConfig(**_TINY, max_position_embeddings=2048, rope_parameters={
        "rope_type": "yarn", "rope_theta": 150000.0, "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
        "original_max_position_embeddings": 64})


def _tokenizer_path():
    from linearard.tiny import bundled_model_path

    return bundled_model_path()


def _inv_freq(config):
    rotary = LlamaRotaryEmbedding(config)
    return rotary.inv_freq, rotary.attention_scaling


def test_llama3_teacher_extends_its_own_scaling():
    teacher = _llama31()
    assert native_window(teacher) == 256  # the window before the teacher's own extension
    student = scaled_config(teacher, parse_rope_spec("llama3:4"))
    assert student.rope_parameters == {**teacher.rope_parameters, "factor": 32.0}
    assert student.max_position_embeddings == 4 * 2048
    (t_freq, _), (s_freq, _) = _inv_freq(teacher), _inv_freq(student)
    # llama3's bands, by wavelength before any scaling: long waves (> 256/low) interpolated, short (< 256/high) kept
    wavelen = 2 * torch.pi / LlamaRotaryEmbedding.compute_default_rope_parameters(teacher)[0]
    low, high = wavelen > 256 / 1.0, wavelen < 256 / 4.0
    assert low.any() and high.any()
    torch.testing.assert_close(s_freq[low], t_freq[low] / 4)  # the teacher's interpolation, ×4 more
    torch.testing.assert_close(s_freq[high], t_freq[high])
    assert (s_freq <= t_freq * (1 + 1e-6)).all()  # nowhere less extended than the teacher


def test_linear_on_a_llama3_teacher_is_refused_in_one_line():
    with pytest.raises(RopeSpecError, match=r"linear cannot extend the teacher's llama3 RoPE.*llama3:<factor>") as err:
        scaled_config(_llama31(), parse_rope_spec("linear:4"))
    assert "\n" not in str(err.value)
    for spec in ("yarn:4", "dynamic:4"):
        with pytest.raises(RopeSpecError, match="llama3"):
            scaled_config(_llama31(), parse_rope_spec(spec))


def test_yarn_teacher_multiplies_its_factor():
    teacher = _gpt_oss_like()
    assert native_window(teacher) == 64
    params, max_positions = student_rope(teacher, parse_rope_spec("yarn:2,beta_fast=16"))
    assert params == {**teacher.rope_parameters, "factor": 64.0, "beta_fast": 16}
    assert max_positions == 4096
    student = scaled_config(teacher, parse_rope_spec("yarn:2"))
    (t_freq, t_scale), (s_freq, s_scale) = _inv_freq(teacher), _inv_freq(student)
    torch.testing.assert_close(s_freq[-4:], t_freq[-4:] / 2)  # the interpolated (lowest) frequencies: /2 more
    torch.testing.assert_close(s_freq[:1], t_freq[:1])  # the extrapolated (highest) one: kept
    assert s_scale > t_scale  # yarn's attention factor follows the new factor (derived, not copied)
    with pytest.raises(RopeSpecError, match="yarn:<factor>"):
        scaled_config(teacher, parse_rope_spec("linear:2"))


def test_per_layer_type_rope_keeps_every_layer_type():
    teacher = Gemma3TextConfig(**_TINY, max_position_embeddings=512, sliding_window=16,
                               layer_types=["sliding_attention", "full_attention"], rope_parameters={
                                   "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                   "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6}})
    assert native_window(teacher) == 512  # linear carries no original window
    student = scaled_config(teacher, parse_rope_spec("linear:4"))
    assert student.rope_parameters == {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                       "full_attention": {"rope_type": "linear", "factor": 32.0, "rope_theta": 1e6}}
    assert student.max_position_embeddings == 2048
    t_rot, s_rot = Gemma3RotaryEmbedding(teacher), Gemma3RotaryEmbedding(student)
    torch.testing.assert_close(s_rot.full_attention_inv_freq, t_rot.full_attention_inv_freq / 4)
    torch.testing.assert_close(s_rot.sliding_attention_inv_freq, t_rot.sliding_attention_inv_freq)
    assert not torch.allclose(t_rot.sliding_attention_inv_freq, t_rot.full_attention_inv_freq)  # two thetas
    assert scaled_config(teacher, parse_rope_spec("native")).rope_parameters == teacher.rope_parameters


def test_longrope_teacher_takes_the_students_factors(tmp_path):
    teacher = Phi3Config(hidden_size=64, num_attention_heads=1, num_key_value_heads=1, num_hidden_layers=1,
                         max_position_embeddings=1024, original_max_position_embeddings=64, rope_parameters={
                             "rope_type": "longrope", "short_factor": [1.0] * 32, "long_factor": [4.0] * 32})
    assert native_window(teacher) == 64
    spec = tmp_path / "longrope.json"
    spec.write_text(json.dumps({"short_factor": [2.0] * 32, "long_factor": [8.0] * 32, "factor": 32.0}))
    student = scaled_config(teacher, parse_rope_spec(f"longrope:{spec}"))
    params = student.rope_parameters
    assert (params["short_factor"], params["long_factor"], params["factor"]) == ([2.0] * 32, [8.0] * 32, 32.0)
    assert params["original_max_position_embeddings"] == 64 and student.max_position_embeddings == 64 * 32
    with pytest.raises(RopeSpecError, match="longrope:<file.json>"):
        scaled_config(teacher, parse_rope_spec("linear:4"))


def test_a_family_that_rejects_the_students_rope_type_is_one_line():
    teacher = Phi3Config(hidden_size=64, num_attention_heads=1, num_key_value_heads=1, num_hidden_layers=1)
    with pytest.raises(RopeSpecError, match="transformers rejects the student's rope_parameters for 'phi3'") as err:
        scaled_config(teacher, parse_rope_spec("linear:4"))
    assert "\n" not in str(err.value)


def test_run_config_refuses_an_undefined_composition_in_one_line(tmp_path):
    AutoModelForCausalLM.from_config(_llama31()).save_pretrained(tmp_path)  # resolve reads the weights' headers
    base = [f"model.teacher={tmp_path}", "model.student=null", "model.tokenizer=" + str(_tokenizer_path())]
    with pytest.raises(ConfigError, match=r"^model.rope: linear cannot extend the teacher's llama3 RoPE") as err:
        resolve(RunConfig.from_yaml(None, [*base, "model.rope=linear:4", "data.ctx_len=128"]))
    assert "\n" not in str(err.value)
    plan = resolve(RunConfig.from_yaml(None, [*base, "model.rope=llama3:4", "data.ctx_len=256"]))
    assert plan.models.rope == "llama3:4" and plan.models.native_window == 256
    with pytest.raises(ConfigError, match="native window 256"):  # the window before the teacher's own extension
        resolve(RunConfig.from_yaml(None, [*base, "model.rope=llama3:4", "data.ctx_len=512"]))


@pytest.mark.parametrize("model_type, rope, spec", [
    ("llama", {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16}, "llama3:4"),
    ("gpt_oss", {"rope_type": "yarn", "rope_theta": 150000.0, "factor": 4.0, "beta_fast": 32.0, "beta_slow": 1.0,
                 "original_max_position_embeddings": 16}, "yarn:2"),
])
def test_a_scaled_teacher_extends_trains_and_reloads(tmp_path, model_type, rope, spec):
    """Llama-3.1-like and gpt-oss-like teachers (their own scaling in the config) through the product's path."""
    path = build_family_model(model_type, tmp_path / "teacher", rope_parameters=rope)
    torch.manual_seed(0)
    plan = plan_for(path, model={"rope": spec}, train={"method": "ard"})
    teacher, student, tokenizer = build_teacher_student(plan.models, LoraConfig(r=4, alpha=8, dropout=0.0))
    assert native_window(teacher.config) == 16
    assert student.config.rope_parameters == {**rope, "factor": rope["factor"] * float(spec.split(":")[1])}
    objective = DistillationLoss(plan.stages[0].config.loss)
    objective.attach(teacher, student)
    batch = {"input_ids": torch.randint(2, 64, (2, 16), generator=torch.Generator().manual_seed(0))}
    losses = train_steps(objective, teacher, student, batch)
    assert losses[-1] < 0.9 * losses[0], losses
    student.eval()
    with torch.no_grad():
        expected = student(**batch).logits
    restored = AutoModelForCausalLM.from_pretrained(save_merged(student, tokenizer, tmp_path / "restored")).eval()
    assert restored.config.rope_parameters == student.config.rope_parameters
    with torch.no_grad():
        torch.testing.assert_close(restored(**batch).logits, expected, rtol=1e-4, atol=1e-4)
