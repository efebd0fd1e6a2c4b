"""The family matrix: every supported family, as a tiny random model, through the product's own path
(``build_teacher_student`` with ``linear:4``, LoRA on the family's targets).

Per family: the teacher under the tap is the model itself (same logits as transformers' default attention);
the tap sees post-RoPE Q/K with the student's frequencies and unrotated V; the relation loss equals a dense
float64 reference on the captured tensors; a packed batch equals each document alone (or packing is refused,
and really would mix documents); a few steps lower the loss and the merged checkpoint reloads with plain
``from_pretrained`` to the student's logits.
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from linearard.capture import attention_inputs, attention_modules, set_tap
from linearard.config import ConfigError, LoraConfig, LossConfig, RunConfig
from linearard.families import MULTIMODAL, RELATIONS, SUPPORTED, resolve_family
from linearard.kernels.reference import relation_kl_dense
from linearard.losses import DistillationLoss
from linearard.models import build_teacher_student, make_trainable, save_merged
from linearard.plan import resolve, resolve_layers
from tests.conftest import plan_for, train_steps
from tests.linearard.tiny_families import student_rope

FAMILIES = sorted([*SUPPORTED, *MULTIMODAL])
WEIGHTS = {"q": 1.0, "k": 1.0, "v": 3.0}


def _pair(model_type, path):
    torch.manual_seed(0)
    plan = plan_for(path, model={"rope": student_rope(model_type, path)})
    teacher, student, tokenizer = build_teacher_student(plan.models, LoraConfig(r=4, alpha=8, dropout=0.0))
    student.eval()  # no dropout: forwards are comparable; grads still flow
    return teacher, student, tokenizer


def _objective(student, **weights) -> DistillationLoss:
    """The objective over the layers the tap sees (as the plan resolves them)."""
    layers = sorted(m.layer_idx for m in attention_modules(student))
    return DistillationLoss(LossConfig(**{**WEIGHTS, **weights}, layers=layers,
                                       hidden_layers=list(range(_layers(student)))))


@pytest.fixture(scope="module", params=FAMILIES)
def case(request, family_model):
    """(model_type, path, family, teacher, student) of one family; tests here leave the models as they were."""
    path = family_model(request.param)
    family = resolve_family(AutoConfig.from_pretrained(path), "lora", None)
    teacher, student, _ = _pair(request.param, path)
    return request.param, path, family, teacher, student


def _layers(model) -> int:
    return model.config.get_text_config().num_hidden_layers


def _padded_batch(length=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(2, length, dtype=torch.long)
    mask[1, length - 5:] = 0
    return {"input_ids": torch.randint(2, 64, (2, length), generator=g), "attention_mask": mask}


def _record(model, batch):
    """Each tapped layer's (q, k, v) of one forward, captured by a tap of our own."""
    seen = {}
    set_tap(model, lambda layer, q, k, v: seen.__setitem__(layer, (q, k, v)))
    with torch.no_grad():
        model(**attention_inputs(batch))
    set_tap(model, None)
    return seen


def test_family_resolves_and_lora_covers_qkv(case):
    model_type, _, family, _, student = case
    layers = tuple(sorted(m.layer_idx for m in attention_modules(student)))
    assert family.attention_layers == layers and layers[0] == 0
    assert family.describe().startswith(f"{model_type}: {len(layers)} of {_layers(student)} layers distilled")
    assert set(family.skipped_layers) == set(range(_layers(student))) - set(layers)
    for module in attention_modules(student):  # every relation has LoRA weights behind it, nothing else trains
        for relation in RELATIONS:
            feeders = [getattr(module, name, None) for name in family.feeders(relation)]
            assert any("lora_A" in n for m in feeders if m is not None for n, _ in m.named_parameters()), relation
    trained = [n for n, p in student.named_parameters() if p.requires_grad]
    assert {n.split(".lora_")[0].rpartition(".")[2] for n in trained} == set(family.lora_targets)
    if family.text_module:  # a multimodal model: LoRA in its text model only, none in the vision tower
        assert all(f".{family.text_module}." in n for n in trained)


def test_teacher_under_the_tap_is_the_model(case):
    _, path, _, teacher, _ = case
    plain = AutoModelForCausalLM.from_pretrained(path).eval()  # transformers' own default attention
    assert plain.config._attn_implementation in ("sdpa", "eager")
    batch = _padded_batch()
    with torch.no_grad():
        torch.testing.assert_close(teacher(**batch).logits, plain(**batch).logits, rtol=1e-6, atol=1e-6)


def test_tap_sees_post_rope_qk_with_the_students_frequencies(case):
    """On one repeated token, layer 0's Q/K depend on position through RoPE alone: a relation logit depends
    only on the distance, and the student (PI ×4) at distance 4m equals the teacher at m."""
    _, _, _, teacher, student = case
    batch = {"input_ids": torch.full((1, 32), 5)}
    t_qkv, s_qkv = _record(teacher, batch)[0], _record(student, batch)[0]
    for index in (0, 1):  # Q·Qᵀ and K·Kᵀ of the last query row, head 0
        t, s = t_qkv[index][0, 0].double(), s_qkv[index][0, 0].double()
        t_row, s_row = t @ t[31], s @ s[31]  # [32]: logits against keys 0..31
        distances = torch.arange(8)
        torch.testing.assert_close(s_row[31 - 4 * distances], t_row[31 - distances], rtol=1e-4, atol=1e-4)
        assert (t_row[31 - distances] - t_row[31]).abs().max() > 1e-2  # RoPE really applied
        assert (s_row[27] - t_row[27]).abs() > 1e-3  # and the student's differs
    torch.testing.assert_close(s_qkv[2], t_qkv[2])  # V is not rotated


def test_relation_loss_matches_dense_reference(case):
    _, _, family, teacher, student = case
    batch = _padded_batch()
    t_seen, s_seen = _record(teacher, batch), _record(student, batch)
    objective = _objective(student)
    objective.attach(teacher, student)
    with torch.no_grad():
        loss, terms = objective(teacher, student, batch)
    objective.release()
    mask = batch["attention_mask"]
    rows = int(mask.sum())
    for index, rel in enumerate(RELATIONS):
        per_layer = [relation_kl_dense(s_seen[layer][index], s_seen[layer][index], t_seen[layer][index],
                                       t_seen[layer][index], mask=mask) / (rows * s_seen[layer][index].shape[1])
                     for layer in family.attention_layers]
        expected = torch.stack(per_layer).mean()
        assert expected > 1e-4
        torch.testing.assert_close(terms[f"ard_{rel}"].double(), expected, rtol=1e-4, atol=1e-7)


def test_packed_batch_is_each_document_alone(case):
    """Two documents longer than the window (4) and chunk (4); the second starts off the chunk grid."""
    model_type, path, family, teacher, student = case
    docs = torch.randint(2, 64, (2, 10), generator=torch.Generator().manual_seed(1))
    packed = {"input_ids": docs.reshape(1, 20), "segment_ids": torch.tensor([[0] * 10 + [1] * 10])}
    with torch.no_grad():
        together = teacher(**attention_inputs(packed)).logits.reshape(2, 10, -1)
        alone = teacher(input_ids=docs).logits
    if family.packed_refusal:
        with pytest.raises(ConfigError, match=model_type):
            resolve_family(AutoConfig.from_pretrained(path), "lora", None, packed=True)
        assert not torch.allclose(together, alone, atol=1e-3)  # the refusal is real: packing would mix them
        return
    torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-4)
    objective = _objective(student, lm=1.0)
    objective.attach(teacher, student)
    with torch.no_grad():
        _, separate = objective(teacher, student, {"input_ids": docs})
        _, joint = objective(teacher, student, packed)
    objective.release()
    for name in ("ard_q", "ard_k", "ard_v", "lm"):
        torch.testing.assert_close(joint[name], separate[name], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("model_type", FAMILIES)
def test_steps_lower_the_loss_and_the_merged_model_reloads(family_model, model_type, tmp_path):
    path = family_model(model_type)
    teacher, student, tokenizer = _pair(model_type, path)
    objective = _objective(student)
    objective.attach(teacher, student)
    losses = train_steps(objective, teacher, student, _padded_batch(seed=2))
    assert math.isfinite(losses[0]) and losses[-1] < 0.9 * losses[0], losses

    set_tap(student, None)
    ids = _padded_batch(seed=3)
    with torch.no_grad():
        expected = student(**ids).logits
        native = teacher(**ids).logits
    out = save_merged(student, tokenizer, tmp_path / "restored")
    restored = AutoModelForCausalLM.from_pretrained(out).eval()  # plain transformers, its default attention
    assert restored.config.get_text_config().rope_parameters == student.config.get_text_config().rope_parameters
    assert not any("lora" in n for n, _ in restored.named_parameters())
    with torch.no_grad():
        got = restored(**ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(got, native, atol=1e-3)


@pytest.mark.parametrize("model_type", ["gemma2", "deepseek_v3", "qwen3_next", "gpt_oss"])
def test_gradient_checkpointing_gives_the_same_gradients(family_model, model_type):
    """Eager attention (softcap, sinks), MLA and a hybrid model under non-reentrant checkpointing: the
    recompute does not re-run the tap's loss, and the gradients are those without checkpointing."""
    path = family_model(model_type)
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        plan = plan_for(path, model={"rope": "linear:4", "trainable": "qkv",
                                     "gradient_checkpointing": checkpointing})
        teacher, student, _ = build_teacher_student(plan.models, LoraConfig())
        objective = _objective(student)
        objective.attach(teacher, student)
        loss, _ = objective(teacher, student, _padded_batch())
        loss.backward()
        objective.release()
        grads.append({n: p.grad for n, p in student.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and all(g.abs().sum() > 0 for g in grads[0].values())
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------------------------ refused in one line
@pytest.mark.parametrize("model_type, words", [
    ("falcon", "never call transformers' attention interface"),
    ("gptj", "no rope_parameters"), ("opt", "no rope_parameters"), ("bloom", "no rope_parameters"),
    ("jetmoe", "mixture-of-attention"), ("diffllama", "differential attention"),
    ("phimoe", "short_mscale/long_mscale"), ("t5", "no causal-LM class"),
    ("deepseek_v32", r"layer types \['indexed_attention'\] are neither"),
    ("ministral3", "not among the families LinearARD tests"),
])
def test_unsupported_families_are_refused_in_one_line(model_type, words):
    with pytest.raises(ConfigError, match=words) as err:
        resolve_family(AutoConfig.for_model(model_type), "lora", None)
    assert f"'{model_type}'" in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("layer_types, words", [
    (["linear_attention", "linear_attention"], "no layer has softmax attention"),
    (["full_attention", "indexed_attention"], r"layer types \['indexed_attention'\] are neither"),
])
def test_a_supported_family_with_layers_the_tap_cannot_see_is_refused(layer_types, words):
    config = AutoConfig.for_model("qwen3_next", num_hidden_layers=2, layer_types=layer_types)
    with pytest.raises(ConfigError, match=words) as err:
        resolve_family(config, "lora", None)
    assert "'qwen3_next'" in str(err.value) and "\n" not in str(err.value)


def test_configured_targets_must_reach_q_k_and_v():
    mla = AutoConfig.for_model("deepseek_v2", q_lora_rank=None)
    assert resolve_family(mla, "lora", None).lora_targets == ("q_proj", "kv_a_proj_with_mqa", "kv_b_proj")
    assert resolve_family(AutoConfig.for_model("deepseek_v3"), "lora", None).lora_targets[:2] == ("q_a_proj",
                                                                                                  "q_b_proj")
    assert resolve_family(AutoConfig.for_model("phi3"), "lora", None).lora_targets == ("qkv_proj",)
    with pytest.raises(ConfigError, match=r"no trainable weights behind K in 'deepseek_v2'") as err:
        resolve_family(mla, "lora", ["q_proj", "k_proj", "v_proj", "o_proj"])
    assert "\n" not in str(err.value)
    assert resolve_family(mla, "full", ["q_proj"]).lora_targets == ("q_proj",)  # full trains everything anyway


def test_a_target_matching_no_module_or_a_relation_without_weights_stops(family_model):
    path = family_model("llama")
    targets = ["q_proj", "k_proj", "v_proj", "wq"]
    with pytest.raises(ConfigError, match=r"\['wq'\] match no module of 'llama'"):
        build_teacher_student(plan_for(path, lora={"target_modules": targets}).models,
                              LoraConfig(target_modules=targets))
    # the check after PEFT wraps the model: a family whose targets leave V untrained is caught there
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="linearard")
    family = replace(resolve_family(model.config, "lora", None), lora_targets=("q_proj", "k_proj"))
    with pytest.raises(ConfigError, match=r"'llama' layer 0: no trainable weights behind V"):
        make_trainable(model, "lora", LoraConfig(r=2), family)


@pytest.mark.parametrize("model_type", ["gemma3", "llama4", "qwen3_next"])
def test_run_config_validates_multimodal_and_hybrid_teachers(family_model, model_type):
    path = family_model(model_type)
    base = [f"model.teacher={path}", "model.student=null", "model.rope=linear:4", "train.method=ard"]
    plan = resolve(RunConfig.from_yaml(None, [*base, "data.ctx_len=32", "loss.layers=[-1]"]))
    assert plan.models.teacher == str(path) and plan.stages[0].config.loss.layers == [plan.models.num_layers - 1]
    with pytest.raises(ConfigError, match="native window 64") as err:
        resolve(RunConfig.from_yaml(None, [*base, "data.ctx_len=128"]))
    assert "\n" not in str(err.value)


def test_loss_layers_without_softmax_attention_are_refused(family_model):
    path = family_model("qwen3_next")
    plan = plan_for(path, train={"method": "ard"})
    assert plan.stages[0].config.loss.layers == [0, 2]  # the linear-attention layer is left out
    with pytest.raises(ConfigError, match=r"loss.layers: layers \[1\] have no softmax attention") as err:
        resolve_layers([1], 3, "loss.layers", attention=plan.models.family.attention_layers)
    assert "\n" not in str(err.value)
    teacher, student, _ = _pair("qwen3_next", path)
    with pytest.raises(ValueError, match=r"loss.layers \[1\] have no softmax attention"):
        DistillationLoss(LossConfig(layers=[1], hidden_layers=[0, 1, 2])).attach(teacher, student)


def test_the_docs_table_is_what_resolve_family_decides():
    """docs/families.md's table is regenerated from every causal-LM default config of the installed transformers
    (scripts/families_table.py); a stale table fails here."""
    script = Path(__file__).resolve().parents[2] / "scripts" / "families_table.py"
    spec = importlib.util.spec_from_file_location("families_table", script)
    families_table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(families_table)
    doc = families_table.DOC.read_text()
    assert families_table.table() in doc, "docs/families.md is stale: run python scripts/families_table.py"
    supported = doc.split("### Supported")[1].split("### Refused")[0]
    rows = [line.split("`")[1] for line in supported.splitlines() if line.startswith("| `")]
    assert rows == FAMILIES  # every supported family is in the matrix above, and only those
