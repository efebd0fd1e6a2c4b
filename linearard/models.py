"""Teacher and student construction, and the merged long-context checkpoint at the end.

teacher: the original model, native RoPE, frozen (no grads, eval mode).
student: the extended model (its own checkpoint, or the teacher's weights) with the plan's ``rope_parameters``
(``linearard.plan``); what trains is LoRA on q/k/v
(PEFT), the full q/k/v projections, or the whole model. Both use the ``"linearard"`` attention so their
post-RoPE Q/K/V can be tapped.
"""

from __future__ import annotations

import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig

from linearard.capture import ATTN_IMPLEMENTATION, attention_modules
from linearard.config import ConfigError, LoraConfig
from linearard.families import RELATIONS, Family, resolve_family
from linearard.plan import ModelPlan
from linearard.rope import with_rope

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build_teacher_student(models: ModelPlan, lora_cfg: LoraConfig,
                          device: torch.device | str | None = None) -> tuple[nn.Module, nn.Module, Any]:
    """Load ``(teacher, student, tokenizer)`` as ``models`` (``linearard.plan.resolve(cfg).models``) says.

    The teacher is frozen in eval mode with its native RoPE. The student is the extended model (``models.student``:
    its own checkpoint, or the teacher's weights) with the plan's ``rope_parameters`` and
    ``max_position_embeddings``, in train mode, with only the parameters of ``models.trainable`` trainable (a
    ``peft.PeftModel`` for "lora"), on the family's targets (``models.family``, resolved by the plan). Seed first
    (``linearard.train.seed_everything``) for a reproducible LoRA init.
    """
    family = models.family
    teacher = _load(models, models.teacher, load_config(models, models.teacher), device)
    teacher.requires_grad_(False)
    teacher.eval()

    # Loaded where from_pretrained puts it (CPU), so only what it does not share with the teacher moves to device.
    config = with_rope(load_config(models, models.student), models.student_rope, models.student_window)
    student = _load(models, models.student, config, None)
    if models.trainable != "full":  # what trains keeps its own copy; what stays frozen is the teacher's if equal
        trained = set(family.lora_targets) if models.trainable == "qkv" else set()
        share_frozen_weights(teacher, student, lambda module: module in trained, check_equal=not models.same_weights)
    if device is not None:
        student.to(device)
    if models.gradient_checkpointing:
        # Non-reentrant: the recompute re-runs the attention tap, which then skips recording (see losses.py).
        enable = getattr(student, "activation_checkpointing_enable", None)  # its name since transformers 5.2x
        if enable is not None:
            enable({"use_reentrant": False})
        else:
            student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    student = make_trainable(student, models.trainable, lora_cfg, family)
    student.train()
    return teacher, student, load_tokenizer(models)


def load_tokenizer(models: ModelPlan) -> Any:
    return AutoTokenizer.from_pretrained(models.tokenizer, revision=models.revision,
                                         trust_remote_code=models.trust_remote_code)


def load_config(models: ModelPlan, path: str) -> PretrainedConfig:
    """The config of one of the plan's models (``models.teacher`` or ``models.student``)."""
    return AutoConfig.from_pretrained(path, revision=models.revision, trust_remote_code=models.trust_remote_code)


def _load(models: ModelPlan, path: str, config: PretrainedConfig, device: torch.device | str | None) -> nn.Module:
    model = AutoModelForCausalLM.from_pretrained(
        path, config=config, revision=models.revision, trust_remote_code=models.trust_remote_code,
        dtype=_DTYPES[models.dtype], attn_implementation=ATTN_IMPLEMENTATION)
    return model.to(device) if device is not None else model


def share_frozen_weights(teacher: nn.Module, student: nn.Module, keep_own: Callable[[str], bool],
                         check_equal: bool = False) -> None:
    """Point the student's parameters at the teacher's tensors of the same name, shape and dtype, except those
    of modules whose last name component ``keep_own`` is true for (those that will train); with ``check_equal``
    (a student from its own checkpoint) only where the values are equal too.

    What does not train stays equal to the teacher's, so one copy serves both: a 7B pair from one checkpoint then
    holds ~13 GB of bf16 weights instead of ~27 GB. The RoPE tables are buffers, not parameters, so the student
    keeps its own scaled ones. FSDP2 later shards each model into its own storage (``fully_shard`` copies shards
    and leaves the original tensors alone), so sharing saves nothing there and costs nothing either.
    """
    teacher_params = dict(teacher.named_parameters(remove_duplicate=False))
    for name, param in list(student.named_parameters(remove_duplicate=False)):
        module_name, _, attr = name.rpartition(".")
        source = teacher_params.get(name)
        if (keep_own(module_name.rpartition(".")[2]) or source is None or source.shape != param.shape
                or source.dtype != param.dtype or (check_equal and not torch.equal(source.detach(), param.detach().to(source.device)))):
            continue
        setattr(student.get_submodule(module_name), attr, source)  # nn.Module registers it as the parameter


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The model's decoder layers: the modules of its ``_no_split_modules`` classes (a PEFT model's too)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    layer_classes = set(getattr(base, "_no_split_modules", None) or ())
    return [m for m in model.modules() if type(m).__name__ in layer_classes]


def compile_layers(model: nn.Module) -> None:
    """``torch.compile`` (in place) every child of every decoder layer except its attention: the RMSNorms and
    the MLP, whose eager elementwise kernels (casts, powers, means, SiLU·up) each become one fused kernel.
    The attention stays eager: it calls the relation-KL tap, whose side effects and autograd hooks a graph
    cannot hold. The modules compile on first use."""
    attention = set(attention_modules(model))
    for layer in decoder_layers(model):
        for child in layer.children():
            if child not in attention:
                child.compile()


def make_trainable(model: nn.Module, trainable: str, lora_cfg: LoraConfig, family: Family | None = None) -> nn.Module:
    """Mark what trains: "lora" (returns a PEFT model), "qkv" (the target projections' own weights) or "full".

    The targets are the modules named ``family.lora_targets`` (``resolve_family`` of the model's config when not
    given), inside ``family.text_module`` for a multimodal model; each name must match (PEFT itself only needs
    one to). Then ``check_trainable``.
    """
    family = family or resolve_family(model.config, trainable, lora_cfg.target_modules)
    inside = f".{family.text_module}." if family.text_module else "."  # a multimodal model: its text model only
    names = [name for name, _ in model.named_modules()
             if name.rpartition(".")[2] in family.lora_targets and inside in f".{name}."]
    unmatched = [t for t in family.lora_targets if not any(n.rpartition(".")[2] == t for n in names)]
    if unmatched and trainable in ("lora", "qkv"):
        raise ConfigError(f"lora.target_modules {unmatched} match no module of {family.model_type!r} (its Q/K/V "
                          f"come from {sorted({n for r in RELATIONS for n in family.feeders(r)})})")
    if trainable == "lora":
        from peft import LoraConfig as PeftLoraConfig, get_peft_model

        peft_cfg = PeftLoraConfig(r=lora_cfg.r, lora_alpha=lora_cfg.alpha, lora_dropout=lora_cfg.dropout,
                                  target_modules=names, bias="none", task_type="CAUSAL_LM")
        with warnings.catch_warnings():  # PEFT 0.21 reads transformers 5's deprecated is_gradient_checkpointing
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            model = get_peft_model(model, peft_cfg)
    elif trainable == "qkv":
        model.requires_grad_(False)
        for name in names:
            model.get_submodule(name).requires_grad_(True)
    elif trainable == "full":
        model.requires_grad_(True)
    else:
        raise ValueError(f"trainable must be one of lora, qkv, full (got {trainable!r})")
    check_trainable(model, family)
    return model


def check_trainable(model: nn.Module, family: Family) -> None:
    """``ConfigError`` (one line) unless the layers the tap sees are ``family.attention_layers`` and Q, K and V
    of each have trainable weights behind them (in the modules ``family.feeders`` names)."""
    modules = attention_modules(model)
    tapped = tuple(sorted(m.layer_idx for m in modules))
    if tapped != family.attention_layers:
        raise ConfigError(f"{family.model_type!r}: the tap sees attention layers {list(tapped)}, its config says "
                          f"{list(family.attention_layers)}")
    for module in modules:
        for relation in RELATIONS:
            feeders = [getattr(module, name, None) for name in family.feeders(relation)]
            if not any(p.requires_grad for m in feeders if m is not None for p in m.parameters()):
                raise ConfigError(f"{family.model_type!r} layer {module.layer_idx}: no trainable weights behind "
                                  f"{relation.upper()} (it comes from {list(family.feeders(relation))}; targets "
                                  f"{list(family.lora_targets)})")


def merged_model(student: nn.Module) -> nn.Module:
    """The student as a plain transformers model: LoRA merged into the weights (in place) for a PEFT model.

    The adapted layers' base weights are copied first: they are shared with the teacher
    (``share_frozen_weights``), and merging adds into them in place.
    """
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    if not isinstance(student, PeftModel):
        return student
    for module in student.modules():
        if isinstance(module, LoraLayer):
            base = module.get_base_layer()
            base.weight = nn.Parameter(base.weight.detach().clone(), requires_grad=False)
    return student.merge_and_unload()


def save_merged(student: nn.Module, tokenizer: Any, out_dir: str | Path) -> Path:
    """Write a plain HF checkpoint (safetensors + tokenizer) of the student, LoRA merged in.

    Its config carries the student's ``rope_parameters``, so ``AutoModelForCausalLM.from_pretrained(out_dir)``
    is the restored long-context model. Merging is in place: the student is no longer a PEFT model afterwards.
    The folder is written next to ``out_dir`` first and moved into place, so a failure leaves nothing half-written.
    """
    out_dir = Path(out_dir)
    model = merged_model(student)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    return out_dir
