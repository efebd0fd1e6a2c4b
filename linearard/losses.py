"""The distillation objective for one micro-batch: the ARD relation loss plus optional terms.

ARD: for every selected layer l and relation r in {Q/Q, K/K, V/V} (Q and K after RoPE), and optionally the
attention map Q/K itself,

    ard_r(l) = Σ_{b,h,i counted} KL(P_teacher(i,·) ‖ P_student(i,·)) / (counted rows × heads of its rows)

where P(i,·) is the causal row softmax of X·Yᵀ/√d (``linearard.kernels.relation_kl``, never an n×n map; X = Y
for a self-relation, X = Q and Y = K for the attention map). Q and Q/K use the query-head count, K and V the
KV-head count, so every relation is a mean KL per (row, head) and K/V are not under-weighted on GQA models.
``ard_r`` is averaged over layers; the total is
``Σ_r w_r·ard_r + w_lm·lm + w_kd·logits_kd + w_hid·hidden_cosine``.

Memory: the teacher runs first and its post-RoPE Q/K/V are kept (detached) for the selected layers; the
student's loss for a layer is computed inside its attention call (a tap). The layer's weighted loss is attached
to its attention output (``capture._InjectLoss``): its gradient flows when backward enters the layer from its
output, which is what FSDP2 (parameters re-gathered by then) and gradient checkpointing (recompute inside the
layer's backward) need.

Gradient checkpointing (non-reentrant only): the op runs once per relation and layer, in the first forward,
under an inner ``saved_tensors_hooks`` that keeps its saved tensors as they are (the innermost hooks win, so
the checkpoint's discard-and-recompute hooks never see them); the checkpoint recompute calls the tap again and
it does nothing then, so the recompute saves exactly the tensors the checkpoint discarded. The cost: the
student's post-RoPE Q, K and V (``B·T·(H + 2·Hkv)·D`` elements) of every distilled layer stay alive from its
forward to its backward, as without checkpointing (Llama-2-7B, bf16: 96 MiB per layer at 4K, 3 GiB over 32
layers; 12 GiB at 16K), instead of a second forward of the n² op.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from linearard.capture import attention_inputs, attention_modules, in_recompute, set_tap
from linearard.config import LossConfig
from linearard.kernels import relation_kl

# relation -> (rows, columns) of its map: the self-relations Q·Qᵀ, K·Kᵀ, V·Vᵀ, and the attention map Q·Kᵀ itself
# (each query head against its KV head under GQA; the same 1/√d scale as the attention).
RELATIONS = {"q": ("q", "q"), "k": ("k", "k"), "v": ("v", "v"), "qk": ("q", "k")}


class DistillationLoss:
    """The LinearARD objective, tapped into a teacher/student pair.

    Usage per micro-batch::

        loss, terms = objective(teacher, student, batch)   # forwards both models
        loss.backward()
        objective.release()                                  # frees the teacher's captured Q/K/V

    ``terms`` holds detached per-term values: ``ard_q``, ``ard_k``, ``ard_v``, ``ard_qk`` (layer means, those
    with weights > 0), and ``lm``,
    ``logits_kd``, ``hidden_cosine`` when their weights are > 0.
    """

    def __init__(self, cfg: LossConfig):
        if cfg.layers is None or cfg.hidden_layers is None:
            raise ValueError("LossConfig.layers and hidden_layers must be resolved to indices (linearard.plan)")
        self.cfg = cfg
        self.layers = list(cfg.layers)
        self.hidden_layers = list(cfg.hidden_layers)
        self.relation_weights = {r: getattr(cfg, r) for r in RELATIONS if getattr(cfg, r) > 0}
        self._teacher_qkv: dict[int, tuple[Tensor, Tensor, Tensor]] = {}
        self._layer_terms: dict[int, dict[str, Tensor]] = {}
        self._phase: str | None = None
        self._mask: Tensor | None = None
        self._segment_ids: Tensor | None = None
        self._rows: Tensor | int = 0  # counted rows of the micro-batch

    # ----------------------------------------------------------------------------------------- taps
    def attach(self, teacher: nn.Module, student: nn.Module) -> None:
        """Install the Q/K/V taps on both models (they must use the "linearard" attention).

        Every distilled layer must have softmax attention (the plan leaves a hybrid model's other layers out);
        one that has none is a ``ValueError``.
        """
        if self.relation_weights:
            set_tap(teacher, self._teacher_tap)
            set_tap(student, self._student_tap)
            attention = sorted(m.layer_idx for m in attention_modules(student))
            if not set(self.layers) <= set(attention):
                raise ValueError(f"loss.layers {sorted(set(self.layers) - set(attention))} have no softmax "
                                 f"attention to distil (attention layers: {attention})")

    def _teacher_tap(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> None:
        if self._phase == "teacher" and layer in self.layers:
            # contiguous once here rather than a copy per op call (the original is freed: no grad)
            self._teacher_qkv[layer] = (q.detach().contiguous(), k.detach().contiguous(), v.detach().contiguous())

    def _student_tap(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor | None:
        if self._phase != "student" or layer not in self._teacher_qkv or in_recompute():
            return None  # a checkpoint recompute: the first forward kept the op's saved tensors (module docstring)
        teacher = dict(zip("qkv", self._teacher_qkv[layer]))
        terms = {}
        # The op's saved tensors are kept as they are; these innermost hooks hide them from the checkpoint's.
        with torch.autograd.graph.saved_tensors_hooks(_keep, _identity):
            used = {name for rel in self.relation_weights for name in RELATIONS[rel]}
            student = {name: x.contiguous() for name, x in (("q", q), ("k", k), ("v", v)) if name in used}  # one copy
            for rel in self.relation_weights:
                rows, cols = RELATIONS[rel]
                kl = relation_kl(student[rows], student[cols], teacher[rows], teacher[cols], mask=self._mask,
                                 segment_ids=self._segment_ids, causal=True, reduction="sum", backend=self.cfg.backend)
                terms[rel] = kl / self._counted(student[rows].shape[1])
            # this layer's share of Σ_r w_r·mean_l ard_r, back-propagated through the attention output
            layer_loss = sum(self.relation_weights[rel] * value for rel, value in terms.items()) / len(self.layers)
        self._layer_terms[layer] = {rel: value.detach() for rel, value in terms.items()}
        return layer_loss

    def _counted(self, heads: int) -> Tensor | int:
        """Counted (row, head) pairs: a device tensor under a padding mask (no host sync), else an int."""
        if isinstance(self._rows, Tensor):
            return (self._rows * heads).clamp_min(1)
        return max(self._rows * heads, 1)

    # -------------------------------------------------------------------------------------- objective
    def __call__(self, teacher: nn.Module, student: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """Forward teacher (no grad) then student on ``batch``; return ``(loss, detached terms)``.

        ``batch``: ``input_ids`` [B,T], optional ``attention_mask`` [B,T] (1 = real token) and
        ``segment_ids`` [B,T] (packed documents).
        """
        cfg = self.cfg
        self.release()
        mask = batch.get("attention_mask")
        self._mask = mask.bool() if mask is not None else None  # the op's mask dtype: no conversion per call
        self._segment_ids = batch.get("segment_ids")
        input_ids = batch["input_ids"]
        self._rows = self._mask.sum() if self._mask is not None else input_ids.numel()
        model_inputs = attention_inputs(batch)
        want_hidden = cfg.hidden_cosine > 0
        kd_keep = (cfg.logits_kd_last_k or 0) if cfg.logits_kd > 0 else 1  # 0 = all positions
        student_keep = 0 if cfg.lm > 0 else kd_keep

        teacher_out = None
        if self.relation_weights or cfg.logits_kd > 0 or want_hidden:
            self._phase = "teacher"
            with torch.no_grad():
                teacher_out = teacher(**model_inputs, output_hidden_states=want_hidden,
                                      logits_to_keep=kd_keep)
        self._phase = "student"
        student_out = student(**model_inputs, output_hidden_states=want_hidden,
                              logits_to_keep=student_keep)

        # The relation losses reach backward through the attention outputs (see module docstring); anchor the
        # backward at the model output so it enters every layer, and add their value (detached) for reporting.
        weighted: list[Tensor] = [student_out.logits.float().sum() * 0]
        terms: dict[str, Tensor] = {}
        if self.relation_weights:
            missing = [layer for layer in self.layers if layer not in self._layer_terms]
            if missing:
                raise RuntimeError(f"no relation loss recorded for layers {missing}: are both models using "
                                   "attn_implementation='linearard' with taps attached?")
            for rel, weight in self.relation_weights.items():
                value = torch.stack([self._layer_terms[layer][rel] for layer in self.layers]).mean()
                terms[f"ard_{rel}"] = value
                weighted.append(weight * value)  # detached: its gradient is injected per layer
        mask = self._mask
        if cfg.lm > 0:
            terms["lm"] = lm_loss(student_out.logits, input_ids, mask, self._segment_ids)
            weighted.append(cfg.lm * terms["lm"])
        if cfg.logits_kd > 0:
            s_logits = student_out.logits[:, -teacher_out.logits.shape[1]:]
            kd_mask = mask[:, -s_logits.shape[1]:] if mask is not None else None
            terms["logits_kd"] = logits_kd(teacher_out.logits, s_logits, kd_mask)
            weighted.append(cfg.logits_kd * terms["logits_kd"])
        if want_hidden:
            terms["hidden_cosine"] = hidden_cosine(
                [teacher_out.hidden_states[i + 1] for i in self.hidden_layers],
                [student_out.hidden_states[i + 1] for i in self.hidden_layers], mask)
            weighted.append(cfg.hidden_cosine * terms["hidden_cosine"])
        self._layer_terms = {}
        return torch.stack(weighted).sum(), {name: value.detach() for name, value in terms.items()}

    def release(self) -> None:
        """Drop the captured teacher Q/K/V (call after backward: a checkpoint recompute still needs them)."""
        self._teacher_qkv = {}
        self._layer_terms = {}
        self._phase = None


# ------------------------------------------------------------------------------------- optional terms
def lm_loss(logits: Tensor, input_ids: Tensor, mask: Tensor | None = None,
            segment_ids: Tensor | None = None) -> Tensor:
    """Next-token cross-entropy, mean over predicted tokens. ``logits`` [B,T,V], ``input_ids`` [B,T].

    Position t predicts t+1 when both are real tokens of the same segment.
    """
    valid = torch.ones_like(input_ids[:, 1:], dtype=torch.bool)
    if mask is not None:
        valid &= mask[:, 1:].bool() & mask[:, :-1].bool()
    if segment_ids is not None:
        valid &= segment_ids[:, 1:] == segment_ids[:, :-1]
    labels = input_ids[:, 1:].masked_fill(~valid, -100)
    return F.cross_entropy(logits[:, :-1].float().flatten(0, 1), labels.flatten(), ignore_index=-100)


def logits_kd(teacher_logits: Tensor, student_logits: Tensor, mask: Tensor | None = None) -> Tensor:
    """KL(P_teacher ‖ P_student) of next-token distributions, mean over real positions. Logits [B,T,V]."""
    kl = F.kl_div(F.log_softmax(student_logits.float(), -1), F.log_softmax(teacher_logits.float(), -1),
                  log_target=True, reduction="none").sum(-1)
    return _masked_mean(kl, mask)


def hidden_cosine(teacher_hidden: list[Tensor], student_hidden: list[Tensor], mask: Tensor | None = None) -> Tensor:
    """1 − cosine similarity of hidden states [B,T,D], mean over real tokens and the given layers."""
    per_layer = [_masked_mean(1 - F.cosine_similarity(s.float(), t.float(), dim=-1), mask)
                 for t, s in zip(teacher_hidden, student_hidden)]
    return torch.stack(per_layer).mean()


def _keep(tensor: Tensor) -> Tensor:
    return tensor.detach()  # as torch's own hooks do: holding the tensor itself would make a reference cycle


def _identity(tensor: Tensor) -> Tensor:
    return tensor


def _masked_mean(values: Tensor, mask: Tensor | None) -> Tensor:
    if mask is None:
        return values.mean()
    weights = mask.to(values.dtype)
    return (values * weights).sum() / weights.sum().clamp_min(1)
