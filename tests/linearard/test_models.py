"""Teacher/student construction for Llama, Mistral, Qwen2, Qwen3 (GQA) and the merged long-context checkpoint."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from linearard.config import LoraConfig
from linearard.models import build_teacher_student, save_merged
from tests.conftest import perturb_lora, plan_for


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3"])
def test_teacher_frozen_student_scaled(tiny_model, family):
    teacher, student, tokenizer = build_teacher_student(
        plan_for(tiny_model(family), model={"rope": "yarn:4"}).models, LoraConfig(r=2, alpha=4))
    assert not teacher.training and student.training
    assert not any(p.requires_grad for p in teacher.parameters())
    assert teacher.config.rope_parameters["rope_type"] == "default"
    assert student.config.rope_parameters["rope_type"] == "yarn"
    assert student.config.max_position_embeddings == 4 * teacher.config.max_position_embeddings
    trainable = {n for n, p in student.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n and any(t in n for t in ("q_proj", "k_proj", "v_proj")) for n in trainable)
    assert teacher.config._attn_implementation == student.config._attn_implementation == "linearard"
    assert tokenizer is not None


@pytest.mark.parametrize("trainable, expected", [("qkv", {"q_proj", "k_proj", "v_proj"}), ("full", None)])
def test_trainable_modes(tiny_model, trainable, expected):
    _, student, _ = build_teacher_student(plan_for(tiny_model(), model={"trainable": trainable}).models,
                                      LoraConfig())
    names = [n for n, p in student.named_parameters() if p.requires_grad]
    if expected is None:
        assert len(names) == len(list(student.parameters()))
    else:
        assert names and {n.split(".")[-2] for n in names} == expected


@pytest.mark.parametrize("trainable", ["lora", "qkv", "full"])
def test_student_shares_the_teachers_frozen_weights(tiny_model, trainable):
    teacher, student, _ = build_teacher_student(plan_for(tiny_model(), model={"trainable": trainable}).models,
                                                LoraConfig(r=2, alpha=4))
    teacher_storage = {p.data_ptr() for p in teacher.parameters()}
    frozen = [(n, p) for n, p in student.named_parameters() if not p.requires_grad]
    trained = [(n, p) for n, p in student.named_parameters() if p.requires_grad]
    assert all(p.data_ptr() not in teacher_storage for _, p in trained)  # what trains is the student's own
    if trainable == "full":
        assert not frozen
    else:  # everything frozen is the teacher's tensor, the RoPE tables (buffers) stay the student's own
        assert frozen and all(p.data_ptr() in teacher_storage for _, p in frozen)
        assert sum(p.numel() for _, p in frozen) == sum(p.numel() for p in teacher.parameters()) - (
            0 if trainable == "lora" else sum(p.numel() for _, p in trained))
    inv_freq = [b for n, b in student.named_buffers() if n.endswith("inv_freq")]
    assert inv_freq and all(b.data_ptr() not in {t.data_ptr() for t in teacher.buffers()} for b in inv_freq)


def test_merged_checkpoint_reloads_as_student(tiny_model, tmp_path):
    torch.manual_seed(0)
    teacher, student, tokenizer = build_teacher_student(
        plan_for(tiny_model("qwen2"), model={"rope": "llama3:8"}).models, LoraConfig(r=2, alpha=4, dropout=0.0))
    perturb_lora(student)
    student.eval()
    ids = torch.randint(0, 64, (2, 10))
    with torch.no_grad():
        expected = student(input_ids=ids).logits
        native = teacher(input_ids=ids).logits
    out = save_merged(student, tokenizer, tmp_path / "restored")
    assert (out / "model.safetensors").exists() and not list(out.glob("*.bin"))
    assert json.loads((out / "config.json").read_text())["rope_parameters"]["rope_type"] == "llama3"
    restored = AutoModelForCausalLM.from_pretrained(out).eval()
    assert restored.config.rope_parameters == student.config.rope_parameters
    assert not any("lora" in n for n, _ in restored.named_parameters())
    with torch.no_grad():
        got = restored(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(got, native, atol=1e-3)
    with torch.no_grad():  # merging wrote into copies, not into the base weights the student shared with the teacher
        torch.testing.assert_close(teacher(input_ids=ids).logits, native, rtol=0, atol=0)
    assert AutoTokenizer.from_pretrained(out).eos_token == "<eos>"


def test_student_from_its_own_checkpoint_shares_only_equal_weights(tiny_model, tiny_extended, tmp_path):
    """The extended model is the student: its own weights (not the teacher's), its own RoPE; the frozen weights
    equal to the teacher's are shared, the changed ones are not; merged, it reloads with plain from_pretrained as
    the long-context model."""
    plan = plan_for(tiny_model(), model={"student": str(tiny_extended), "rope": None})
    torch.manual_seed(0)
    teacher, student, tokenizer = build_teacher_student(plan.models, LoraConfig(r=2, alpha=4, dropout=0.0))
    own = AutoModelForCausalLM.from_pretrained(tiny_extended)
    teacher_storage = {p.data_ptr() for p in teacher.parameters()}
    base = dict(student.get_base_model().named_parameters())
    changed = {"model.layers.0.mlp.up_proj.weight", "model.layers.0.self_attn.q_proj.base_layer.weight"}
    for name, param in base.items():
        if "lora_" in name:
            continue
        reference = own.get_parameter(name.replace(".base_layer", ""))
        torch.testing.assert_close(param, reference, rtol=0, atol=0)  # the student is the extended checkpoint
        assert (param.data_ptr() in teacher_storage) == (name not in changed), name
    assert student.config.rope_parameters["rope_type"] == "linear" and student.config.max_position_embeddings == 256
    perturb_lora(student)
    student.eval()
    ids = torch.randint(0, 64, (2, 10))
    with torch.no_grad():
        expected = student(input_ids=ids).logits
    out = save_merged(student, tokenizer, tmp_path / "restored")
    restored = AutoModelForCausalLM.from_pretrained(out).eval()
    assert restored.config.rope_parameters == own.config.rope_parameters
    assert restored.config.max_position_embeddings == 256
    with torch.no_grad():
        torch.testing.assert_close(restored(input_ids=ids).logits, expected, rtol=1e-4, atol=1e-5)
