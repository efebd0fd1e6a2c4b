"""The ARD objective on tiny GQA models: exact zero at native RoPE, per-tensor head normalisation against a
dense reference, no teacher gradients, gradient checkpointing without double counting, packed documents."""

from __future__ import annotations

import math

import pytest
import torch

from linearard import losses
from linearard.capture import set_tap
from linearard.config import LoraConfig, LossConfig
from linearard.kernels import relation_kl
from linearard.losses import DistillationLoss
from linearard.models import build_teacher_student
from tests.conftest import plan_for


def _pair(path, rope="linear:4", trainable="lora", checkpointing=False):
    torch.manual_seed(0)
    plan = plan_for(path, model={"rope": rope, "trainable": trainable, "gradient_checkpointing": checkpointing})
    return build_teacher_student(plan.models, LoraConfig(r=4, alpha=8, dropout=0.0))[:2]


def _objective(layers=(0, 1), **weights):
    """The objective of a 2-layer model (layer lists as the plan resolves them)."""
    return DistillationLoss(LossConfig(layers=list(layers), hidden_layers=[0, 1], **weights))


def _batch(bsz=2, length=12, pad=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(bsz, length, dtype=torch.long)
    mask[-1, length - pad:] = 0
    return {"input_ids": torch.randint(0, 64, (bsz, length), generator=g), "attention_mask": mask}


def _dense_kl_sum(s, t, mask):
    """Σ over real rows and heads of KL(softmax(t tᵀ/√d) ‖ softmax(s sᵀ/√d)), causal, pad columns out (float64)."""
    s, t = s.double(), t.double()
    length = s.shape[2]
    valid = torch.ones(length, length).tril().bool()[None, None] & mask.bool()[:, None, None, :]
    def logp(x):
        logits = (x @ x.transpose(-1, -2)) / math.sqrt(x.shape[-1])
        return torch.log_softmax(logits.masked_fill(~valid, -math.inf), -1)
    lt, ls = logp(t), logp(s)
    kl = torch.where(valid, lt.exp() * (lt - ls), torch.zeros(())).sum(-1)
    return (kl * mask[:, None, :]).sum()


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_zero_at_native_rope_positive_when_scaled(tiny_model, family):
    batch = _batch()
    cfg = LossConfig(lm=0.0, logits_kd=1.0, hidden_cosine=1.0, layers=[0, 1], hidden_layers=[0, 1])
    teacher, student = _pair(tiny_model(family), rope="native")
    objective = DistillationLoss(cfg)
    objective.attach(teacher, student)
    loss, terms = objective(teacher, student, batch)
    for name in ("ard_q", "ard_k", "ard_v", "logits_kd"):
        assert terms[name].item() == 0.0, terms  # exactly: same weights, same RoPE
    assert abs(terms["hidden_cosine"].item()) < 1e-6  # 1 - cos(x, x) rounds

    teacher, student = _pair(tiny_model(family), rope="linear:4")
    objective = DistillationLoss(cfg)
    objective.attach(teacher, student)
    loss, terms = objective(teacher, student, batch)
    assert set(terms) == {"ard_q", "ard_k", "ard_v", "logits_kd", "hidden_cosine"}
    assert all(v.item() > 1e-4 for v in terms.values()), terms
    loss.backward()
    objective.release()
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters() if p.requires_grad)


def test_normalisation_matches_dense_reference(tiny_model):
    path, batch = tiny_model("llama"), _batch()
    teacher, student = _pair(path, trainable="qkv")
    seen = {}
    for name, model in (("t", teacher), ("s", student)):  # independent capture of both models' Q/K/V
        set_tap(model, lambda layer, q, k, v, name=name: seen.__setitem__((name, layer), (q, k, v)))
        with torch.no_grad():
            model(**batch)
    weights = {"q": 1.0, "k": 0.5, "v": 2.0}
    objective = _objective((0, 1), **weights)
    objective.attach(teacher, student)
    loss, terms = objective(teacher, student, batch)
    rows = int(batch["attention_mask"].sum())
    expected = {}
    for index, rel in enumerate("qkv"):
        per_layer = []
        for layer in (0, 1):
            s, t = seen[("s", layer)][index], seen[("t", layer)][index]
            heads = s.shape[1]  # Q: 4 query heads; K, V: 2 KV heads (GQA)
            per_layer.append(_dense_kl_sum(s, t, batch["attention_mask"]) / (rows * heads))
        expected[rel] = torch.stack(per_layer).mean()
        torch.testing.assert_close(terms[f"ard_{rel}"].double(), expected[rel], rtol=1e-4, atol=1e-7)
    total = sum(weights[r] * expected[r] for r in "qkv")
    torch.testing.assert_close(loss.double(), total, rtol=1e-4, atol=1e-7)

    # gradients (injected per layer at the attention outputs) equal those of the dense loss
    loss.backward()
    objective.release()
    ours = {n: p.grad.clone() for n, p in student.named_parameters() if p.requires_grad}
    student.zero_grad()
    live = {}
    set_tap(student, lambda layer, q, k, v: live.__setitem__(layer, (q, k, v)))
    student(**batch)
    dense = sum(weights[rel] * torch.stack([
        _dense_kl_sum(live[layer][i], seen[("t", layer)][i], batch["attention_mask"])
        / (rows * live[layer][i].shape[1]) for layer in (0, 1)]).mean() for i, rel in enumerate("qkv"))
    dense.backward()
    for name, grad in ours.items():
        torch.testing.assert_close(grad.double(), dict(student.named_parameters())[name].grad.double(),
                                   rtol=1e-3, atol=1e-6)


def test_layer_selection(tiny_model):
    teacher, student = _pair(tiny_model("llama"))
    batch = _batch()
    values = {}
    for layers in ([0], [1], [0, 1]):
        objective = _objective(layers)
        objective.attach(teacher, student)
        with torch.no_grad():
            values[str(layers)] = objective(teacher, student, batch)[1]["ard_k"]
        objective.release()
    torch.testing.assert_close(values["[0, 1]"], (values["[0]"] + values["[1]"]) / 2)


@pytest.mark.parametrize("backend", ["torch", "triton"])  # triton: the interpreter on CPU
def test_gradient_checkpointing_runs_op_once_same_grads(tiny_model, monkeypatch, backend):
    """With checkpointing the op runs once per relation and layer (not again in the recompute), and the
    relation gradients equal those without checkpointing exactly."""
    path, batch = tiny_model("llama"), _batch()
    op_calls = []
    def counting_op(*args, **kwargs):
        op_calls.append(torch._C._current_graph_task_id() != -1)  # True inside backward (a recompute)
        return relation_kl(*args, **kwargs)
    monkeypatch.setattr(losses, "relation_kl", counting_op)
    results = []
    for checkpointing in (False, True):
        teacher, student = _pair(path, trainable="qkv", checkpointing=checkpointing)
        objective = _objective(backend=backend)  # relations only: all gradient from the op
        objective.attach(teacher, student)
        tap_in_backward = []
        inner_tap = student.model.layers[0].self_attn._linearard_tap
        def counting_tap(layer, q, k, v):
            tap_in_backward.append(torch._C._current_graph_task_id() != -1)
            return inner_tap(layer, q, k, v)
        set_tap(student, counting_tap)
        op_calls.clear()
        loss, _ = objective(teacher, student, batch)
        loss.backward()
        objective.release()
        assert any(tap_in_backward) == checkpointing  # the recompute really re-ran the attention
        assert op_calls == [False] * 6  # 2 layers × 3 relations, all in the forward
        grads = {n: p.grad.clone() for n, p in student.named_parameters() if p.requires_grad}
        assert all(g.abs().sum() > 0 for g in grads.values() if g is not None)
        results.append((loss.detach(), grads))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert torch.equal(loss_a, loss_b)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        assert torch.equal(grads_a[name], grads_b[name]), name


def test_packed_equals_separate_documents(tiny_model):
    teacher, student = _pair(tiny_model("qwen2"))
    objective = _objective(lm=1.0)
    objective.attach(teacher, student)
    docs = torch.randint(0, 64, (2, 8))
    with torch.no_grad():
        _, separate = objective(teacher, student, {"input_ids": docs})
        packed = {"input_ids": docs.reshape(1, 16), "segment_ids": torch.tensor([[0] * 8 + [1] * 8])}
        _, together = objective(teacher, student, packed)
    for name in ("ard_q", "ard_k", "ard_v", "lm"):
        torch.testing.assert_close(together[name], separate[name], rtol=1e-5, atol=1e-7)
