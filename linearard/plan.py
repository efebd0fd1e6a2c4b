"""The run plan: a config resolved once, on the driver, into everything the steps of a run read.

    plan = resolve(RunConfig.from_yaml("run.yaml"))   # ConfigError (one line) on anything that cannot run
    plan.models          # what the teacher and the student are: read from their config.json files alone
    plan.stages          # the training stages, each a full config with its method's preset applied
    plan.eval            # the evaluation config, native context resolved
    plan.output          # where every artifact of the run goes

The plan travels to Ray workers and tasks as it is (it pickles); nothing downstream parses the config, a RoPE
spec or a layer index again, and nothing writes into the plan.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from linearard.config import LOSS_TERMS, ConfigError, DataConfig, EvalConfig, RunConfig
from linearard.data import is_heldout, is_local_source, local_files, looks_binary, read_texts
from linearard.rope import RopeSpecError, native_window, parse_rope_spec, student_rope, with_rope

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")  # org/name; anything else must be a local path
SQLITE = "sqlite:///"


@dataclass(frozen=True)
class ModelPlan:
    """The teacher and the student, as the workers build them (``linearard.models.build_teacher_student``)."""

    teacher: str  # local path or hub id
    student: str  # where the student's weights come from: the extended model, or the teacher's own
    tokenizer: str
    revision: str | None
    dtype: str
    trust_remote_code: bool
    trainable: str
    gradient_checkpointing: bool
    model_type: str
    num_layers: int
    native_window: int  # the teacher's native context n
    rope: str  # the student's RoPE in words: the spec the user gave, or the extended model's own
    student_rope: dict[str, Any]  # the student's rope_parameters
    student_window: int  # the student's max_position_embeddings
    family: Any  # linearard.families.Family: the layers the tap sees, the LoRA targets, what is special

    @property
    def same_weights(self) -> bool:
        """Whether the student starts from the teacher's own weights (then what does not train is shared)."""
        return self.student == self.teacher


@dataclass(frozen=True)
class Stage:
    """One training stage: a Ray Train run of ``config.train.steps`` steps."""

    method: str  # ard | cpt | logits_kd | hidden_cosine
    config: RunConfig  # the run's config with this method's preset applied and layer lists resolved
    run_name: str  # the Ray Train run (the folder of its checkpoints under output.storage_path)
    first_step: int  # steps of the stages before it: the stages share one step axis


@dataclass(frozen=True)
class OutputLayout:
    """Where a run's artifacts go."""

    root: Path
    config_file: Path  # the run's resolved config.yaml
    report_dir: Path  # report.json / report.md / plots
    model_dir: Path  # the merged restored model (HF format)
    storage_path: str  # Ray Train's storage: checkpoints (a local folder or a URI such as s3://...)


@dataclass(frozen=True)
class Plan:
    config: RunConfig  # the user's config with paths made absolute
    models: ModelPlan
    stages: tuple[Stage, ...]
    eval: EvalConfig
    output: OutputLayout

    @property
    def steps(self) -> int:
        return sum(stage.config.train.steps for stage in self.stages)


def resolve(cfg: RunConfig) -> Plan:
    """Resolve a checked config against the models and the data; raise ``ConfigError`` (one line) if it cannot
    run. Reads the models' config.json, their weights' headers (no weights) and tokenizer, and the data source's
    first documents: a few seconds, on the driver, before anything starts."""
    cfg = _absolute_paths(cfg)
    _check_source(cfg.data)
    models = _model_plan(cfg)
    stages = tuple(_stages(cfg, models))
    eval_cfg = dataclasses.replace(cfg.eval, ctx_len=cfg.eval.ctx_len or models.native_window)
    root = Path(cfg.train.output_dir)
    storage = cfg.ray.storage_path
    if not (storage and "://" in storage):
        storage = str(Path(storage or root / "ray").expanduser().resolve())
    output = OutputLayout(root=root, config_file=root / "config.yaml", report_dir=root / "report",
                          model_dir=root / "model", storage_path=storage)
    return Plan(config=cfg, models=models, stages=stages, eval=eval_cfg, output=output)


def load_model_config(name_or_path: str, revision: str | None = None, trust_remote_code: bool = False,
                      key: str = "model.teacher") -> Any:
    """A model's transformers config (reads config.json only); ``ConfigError`` naming ``key`` if it cannot."""
    from transformers import AutoConfig

    if not Path(name_or_path).expanduser().exists() and not _HUB_ID.fullmatch(name_or_path):
        raise ConfigError(f"{key}: no such model path {name_or_path!r}")
    try:
        return AutoConfig.from_pretrained(name_or_path, revision=revision, trust_remote_code=trust_remote_code)
    except Exception as err:  # noqa: BLE001 - any load failure is the same user error
        raise ConfigError(f"{key}: cannot load the config of {name_or_path!r} ({_reason(err)})") from None


def resolve_layers(indices: list[int] | None, num_layers: int, key: str,
                   attention: tuple[int, ...] | None = None) -> list[int]:
    """Layer indices (None = all, negative = from the end) as sorted non-negative indices; with ``attention``
    (the layers with softmax attention), None means those, and any other index is refused."""
    if indices is None:
        return list(attention) if attention is not None else list(range(num_layers))
    for index in indices:
        if not -num_layers <= index < num_layers:
            raise ConfigError(f"{key}: layer index {index} is out of range for a teacher with {num_layers} layers")
    resolved = sorted({index % num_layers for index in indices})
    if attention is not None and not set(resolved) <= set(attention):
        raise ConfigError(f"{key}: layers {sorted(set(resolved) - set(attention))} have no softmax attention to "
                          f"distil (the teacher's attention layers: {list(attention)})")
    return resolved


FIRST_DOCUMENTS = 16  # documents of the source read on the driver: where a broken corpus shows, in seconds


def _check_source(data: DataConfig) -> None:
    """A data source that reads as text: a local file/folder with readable files, or a hub dataset (which needs
    the ``datasets`` package); its first ``FIRST_DOCUMENTS`` documents read (no truncated archive, a text field
    in each, not null), are text (not binary, not all empty) and are not all held out. The rest of a large
    corpus is read by Ray Data during training."""
    source = data.source
    if is_local_source(source):
        try:
            local_files(source)
        except FileNotFoundError:
            raise ConfigError(f"data.source: no such file or folder {source!r}") from None
        except ValueError as err:
            raise ConfigError(f"data.source: {err}") from None
    else:
        try:
            import datasets  # noqa: F401
        except ImportError:
            raise ConfigError(f"data.source: {source!r} is a hub dataset, which needs the `datasets` package "
                              "(pip install datasets); or give a local .jsonl/.parquet/.txt path") from None
    try:
        texts = list(itertools.islice(read_texts(source, data.text_field), FIRST_DOCUMENTS))
    except Exception as err:  # noqa: BLE001 - whatever a reader raises (gzip, JSON, Arrow, hub), the source is bad
        raise ConfigError(f"data.source: cannot read {source!r} ({_reason(err)})") from None
    if not texts:
        raise ConfigError(f"data.source: {source!r} holds no documents")
    if any(looks_binary(text) for text in texts):
        raise ConfigError(f"data.source: {source!r} holds binary data, not text (in its first {len(texts)} "
                          "documents)")
    if not any(text.strip() for text in texts):
        raise ConfigError(f"data.source: the first {len(texts)} documents of {source!r} have no text "
                          f"(data.text_field {data.text_field!r} is empty)")
    if all(is_heldout(text, data.eval_fraction) for text in texts):
        raise ConfigError(f"data.eval_fraction {data.eval_fraction} holds out all of the first {len(texts)} "
                          f"documents of {source!r}: nothing is left to train on (are they all the same?)")


def _reason(err: BaseException) -> str:
    """``"TypeName: first line"`` of an exception, for a one-line error."""
    text = str(err.args[0] if isinstance(err, KeyError) and err.args else err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0]}" if text else type(err).__name__


# ------------------------------------------------------------------------------------------- models
def _model_plan(cfg: RunConfig) -> ModelPlan:
    from linearard.families import resolve_family

    m = cfg.model
    teacher_config = load_model_config(m.teacher, m.revision, m.trust_remote_code)
    family = resolve_family(teacher_config, m.trainable, cfg.lora.target_modules, packed=cfg.data.mode == "packed")
    teacher = teacher_config.get_text_config()
    student = teacher
    if m.student is not None:
        student = load_model_config(m.student, m.revision, m.trust_remote_code, key="model.student").get_text_config()
        _check_extends(teacher, student)
    if m.rope is None:  # the extended model's own RoPE
        rope_parameters, window = dict(student.rope_parameters or {}), int(student.max_position_embeddings)
        label = _rope_label(rope_parameters, window, native_window(teacher))
    else:
        try:
            rope_parameters, window = student_rope(teacher, parse_rope_spec(m.rope))
            with_rope(student, rope_parameters, window)  # transformers' own check of the composed parameters
        except (RopeSpecError, KeyError, TypeError, ValueError) as err:
            raise ConfigError(f"model.rope: {err}") from None
        label = m.rope
    if m.student is not None and (rope_parameters, window) == (teacher.rope_parameters, teacher.max_position_embeddings):
        raise ConfigError(f"model.student {m.student!r} has the teacher's own RoPE ({_rope_label(rope_parameters, window, window)}): "
                          "nothing to restore; give the extended model, or extend it with model.rope")
    # What the configs say is right: now the files the workers will read.
    _check_weights(m.teacher, "model.teacher")
    if m.student is not None:
        _check_weights(m.student, "model.student")
    _check_tokenizer(m.tokenizer or m.teacher, m.revision, m.trust_remote_code,
                     "model.tokenizer" if m.tokenizer else "model.teacher")
    return ModelPlan(
        teacher=m.teacher, student=m.student or m.teacher, tokenizer=m.tokenizer or m.teacher, revision=m.revision,
        dtype=m.dtype, trust_remote_code=m.trust_remote_code, trainable=m.trainable,
        gradient_checkpointing=m.gradient_checkpointing, model_type=teacher.model_type,
        num_layers=int(teacher.num_hidden_layers), native_window=native_window(teacher), rope=label,
        student_rope=rope_parameters, student_window=window, family=family)


def _check_weights(name_or_path: str, key: str) -> None:
    """A local model folder holds weights whose headers read: ``model.safetensors`` or every shard its index
    names (safetensors checks a header against the file's size, so a truncated download fails here, not in a
    worker), or PyTorch ``pytorch_model*.bin`` files. A hub model's files are fetched by the workers."""
    folder = Path(name_or_path).expanduser()
    if not folder.is_dir():
        return
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            files = [folder / name for name in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            raise ConfigError(f"{key}: cannot read the weights index {str(index)!r} ({_reason(err)})") from None
    elif (folder / "model.safetensors").is_file():
        files = [folder / "model.safetensors"]
    elif any(folder.glob("pytorch_model*.bin")):
        return
    else:
        raise ConfigError(f"{key}: no weights in {str(folder)!r} (model.safetensors, its shards, or "
                          "pytorch_model.bin)")
    from safetensors import safe_open

    for file in files:
        try:
            with safe_open(str(file), framework="pt"):
                pass
        except Exception as err:  # noqa: BLE001 - missing, truncated or not safetensors: the same user error
            raise ConfigError(f"{key}: cannot read the weights {str(file)!r} ({_reason(err)}): a truncated or "
                              "incomplete download?") from None


def _check_tokenizer(name_or_path: str, revision: str | None, trust_remote_code: bool, key: str) -> None:
    """The tokenizer loads (as the data stage and the evaluation load it)."""
    from transformers import AutoTokenizer

    try:
        AutoTokenizer.from_pretrained(name_or_path, revision=revision, trust_remote_code=trust_remote_code)
    except Exception as err:  # noqa: BLE001 - no tokenizer files, or files it cannot read: the same user error
        raise ConfigError(f"{key}: no tokenizer loads from {name_or_path!r} ({_reason(err)})") from None


# What an extended model shares with its base: the architecture and its shapes, and the vocabulary.
_SAME_SHAPE = ("model_type", "num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads",
               "head_dim", "vocab_size")


def _check_extends(teacher: Any, student: Any) -> None:
    """The student checkpoint is the teacher's architecture with the same shapes (from the configs alone)."""
    for key in _SAME_SHAPE:
        mine, theirs = getattr(student, key, None), getattr(teacher, key, None)
        if key == "head_dim" and None in (mine, theirs):  # configs that derive it from hidden_size / heads
            continue
        if mine != theirs:
            raise ConfigError(f"model.student: its {key} is {mine!r}, the teacher's {theirs!r}: the student must be "
                              "the teacher's architecture extended (same family, layers, heads, head size, vocabulary)")


def _rope_label(rope_parameters: dict[str, Any], window: int, native: int) -> str:
    """``"linear:4.0 (window 1024)"``: a RoPE in the words of a spec."""
    kind = rope_parameters.get("rope_type", "default")
    factor = rope_parameters.get("factor")
    return f"{kind}{f':{factor:g}' if factor else ''} (window {window}, native {native})"


# ------------------------------------------------------------------------------------------- stages
_NONE = {key: 0.0 for key in LOSS_TERMS}
# What each single-stage method sets where the user set nothing: its loss weights and learning rate. ard is the
# paper's recipe (Q/Q, K/K, V/V, equal weights); the learning rates are the bundled model's (docs/baselines.md).
METHOD_LOSS = {"ard": {**_NONE, "q": 1.0, "k": 1.0, "v": 1.0}, "cpt": {**_NONE, "lm": 1.0},
               "logits_kd": {**_NONE, "logits_kd": 1.0}, "hidden_cosine": {**_NONE, "hidden_cosine": 1.0}}
METHOD_LR = {"ard": 3e-3, "cpt": 3e-3, "logits_kd": 1e-4, "hidden_cosine": 3e-3}
# Logits KD restores an extended checkpoint gently (lr 1e-4 keeps what its CPT taught it: retrieval at n and 4n;
# 1e-3 and up forget it). A RoPE-only extension of the teacher's weights has nothing to keep and much to
# recover: at 1e-4 it stays at 1.68 x the teacher's PPL@n, at 3e-3 it gets to 1.06 x (docs/baselines.md).
ROPE_ONLY_LR = {"logits_kd": 3e-3}


def _stages(cfg: RunConfig, models: ModelPlan) -> list[Stage]:
    """The training stages of ``train.method``: one, or for ard+cpt an ARD stage then a CPT stage."""
    tr = cfg.train
    if tr.method == "ard+cpt":
        cpt_steps = tr.cpt_steps if tr.cpt_steps is not None else tr.steps // 4
        parts = [("ard", tr.steps - cpt_steps, False), ("cpt", cpt_steps, True)]
    else:
        parts = [(tr.method, tr.steps, False)]
    name = f"train-{Path(tr.output_dir).name}"
    stages, first = [], 0
    for method, steps, forced in parts:
        config = _preset(cfg, method, steps, forced, rope_only=models.same_weights)
        if config.data.ctx_len > models.native_window and config.loss.reads_teacher:
            raise ConfigError(f"data.ctx_len {config.data.ctx_len} is longer than the teacher's native window "
                              f"{models.native_window} (ARD trains on short text the teacher reads natively)")
        config.loss.layers = resolve_layers(config.loss.layers, models.num_layers, "loss.layers",
                                            attention=models.family.attention_layers)
        config.loss.hidden_layers = resolve_layers(config.loss.hidden_layers, models.num_layers, "loss.hidden_layers")
        run_name = f"{name}-{method}" if len(parts) > 1 else name
        stages.append(Stage(method=method, config=config, run_name=run_name, first_step=first))
        first += steps
    return stages


def _preset(cfg: RunConfig, method: str, steps: int, forced: bool, rope_only: bool) -> RunConfig:
    """``cfg`` for one stage of ``method``. Its loss weights fill the keys the user did not set (all of them for
    the CPT stage of ard+cpt, ``forced``), its learning rate an unset ``optim.lr``; CPT always reads 4n-token
    blocks, 4 times fewer per step, so every method sees the same tokens per step."""
    config = copy.deepcopy(cfg)
    config.train.method, config.train.steps, config.train.cpt_steps = method, steps, None
    for key, value in METHOD_LOSS[method].items():
        if forced or not cfg.user_set(f"loss.{key}"):
            setattr(config.loss, key, value)
    if cfg.optim.lr is None:
        config.optim.lr = (ROPE_ONLY_LR if rope_only else METHOD_LR).get(method, METHOD_LR[method])
    if method == "cpt":
        config.data.ctx_len = 4 * cfg.data.ctx_len
        config.train.batch_size, config.train.grad_accum = max(1, cfg.train.batch_size // 4), 1
    if not any(getattr(config.loss, key) > 0 for key in LOSS_TERMS):
        raise ConfigError(f"loss: every term has weight 0; set at least one of {', '.join(LOSS_TERMS)} > 0")
    return config


def _absolute_paths(cfg: RunConfig) -> RunConfig:
    """A copy whose local paths (models, tokenizer, corpus, restored model, output folder, sqlite store) are
    absolute: Ray Train runs its workers in another folder. Hub ids, which name no local path, stay."""
    def absolute(name_or_path: str | None) -> str | None:
        path = Path(name_or_path).expanduser() if name_or_path else None
        return str(path.resolve()) if path is not None and path.exists() else name_or_path

    cfg = copy.deepcopy(cfg)
    m = cfg.model
    m.teacher, m.student, m.tokenizer = absolute(m.teacher), absolute(m.student), absolute(m.tokenizer)
    cfg.data.source, cfg.eval.restored = absolute(cfg.data.source), absolute(cfg.eval.restored)
    cfg.train.output_dir = str(Path(cfg.train.output_dir).expanduser().resolve())
    uri = cfg.tracking.uri
    if uri.startswith(SQLITE) and not uri[len(SQLITE):].startswith("/"):
        cfg.tracking.uri = SQLITE + str(Path(uri[len(SQLITE):]).resolve())
    return cfg

