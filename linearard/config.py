"""One run config for the whole job: a dataclass tree, loaded from YAML, overridden from the command line,
validated before any model loads.

    cfg = RunConfig.from_yaml("run.yaml", ["--train.steps", "20", "loss.layers=[0,2]"])
    cfg.to_dict()  # plain dict (YAML/MLflow-ready)

Every problem is a ``ConfigError`` (a ``ValueError``) with a one-line message that names the key.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from linearard.rope import NATIVE, RopeSpecError, parse_rope_spec
from linearard.tiny import ASSETS, bundled_model_path

DTYPES = ("float32", "bfloat16", "float16")
TRAINABLE = ("lora", "qkv", "full")
DATA_MODES = ("per_document", "packed")
BACKENDS = ("auto", "torch", "triton")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")  # org/name; anything else must be a local path


# The restoring methods, each one flag (`train.method`); a preset fills the keys the user left unset.
# Every method trains on the same data and the same number of tokens per step as ARD.
METHODS = {
    "ard": "LinearARD: relation KL of Q/Q, K/K, V/V against the teacher (the default)",
    "cpt": "continual pre-training: next-token loss on the student at 4n (batch / 4: same tokens per step)",
    "logits_kd": "KL(teacher || student) of the next-token distributions at n",
    "hidden_cosine": "1 - cosine of every decoder layer's output against the teacher at n (LongReD-style)",
    "ard+cpt": "ARD, then a CPT stage for train.cpt_steps of the steps (the paper's pipeline)",
}
_NO_RELATIONS = {"q": 0.0, "k": 0.0, "v": 0.0}


def method_preset(method: str, ctx_len: int, batch_size: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """What ``train.method`` sets, as two nested dicts: ``(defaults, blocks)``.

    ``defaults`` are loss weights, filled where the user set none. ``blocks`` are always set, derived from the
    run's short-text block length n (``ctx_len``) and sequences per step: CPT reads 4n-token blocks, 4 times
    fewer per step, so every method sees the same tokens per step.
    """
    if method == "cpt":
        return ({"loss": {**_NO_RELATIONS, "lm": 1.0}},
                {"data": {"ctx_len": 4 * ctx_len}, "train": {"batch_size": max(1, batch_size // 4), "grad_accum": 1}})
    if method == "logits_kd":
        return {"loss": {**_NO_RELATIONS, "logits_kd": 1.0}}, {}
    if method == "hidden_cosine":
        return {"loss": {**_NO_RELATIONS, "hidden_cosine": 1.0}}, {}
    return {}, {}


class ConfigError(ValueError):
    """A bad run config; the message is one line and names the offending key."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


@dataclass
class ModelConfig:
    """Teacher and student models."""

    teacher: str = str(bundled_model_path())  # local path or hub id of any RoPE causal LM
    tokenizer: str | None = None  # defaults to `teacher`
    revision: str | None = None
    rope: str = "linear:4"  # the student's RoPE (see linearard.rope)
    trainable: str = "lora"  # lora | qkv (full q/k/v projections) | full (whole model)
    dtype: str = "float32"  # weights dtype: float32 | bfloat16 | float16
    trust_remote_code: bool = False
    gradient_checkpointing: bool = False  # non-reentrant, on the student


@dataclass
class LoraConfig:
    """PEFT LoRA on the student (used when model.trainable == "lora"). Published recipe: r=1024, alpha=2048."""

    r: int = 64
    alpha: float = 128.0
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj"])


@dataclass
class LossConfig:
    """The ARD relation loss and the optional terms; a weight of 0 turns a term off."""

    q: float = 1.0  # Q/Q relation weight
    k: float = 1.0  # K/K
    v: float = 3.0  # V/V (weighted up: on the bundled model V/V recovers the most per token, docs/tiny-model.md)
    layers: list[int] | None = None  # layers whose relations are distilled; None = all (negative = from the end)
    lm: float = 0.0  # next-token cross-entropy on the student
    logits_kd: float = 0.0  # KL(teacher || student) of next-token distributions
    logits_kd_last_k: int | None = None  # only the last k positions of each row; None = all
    hidden_cosine: float = 0.0  # 1 - cosine of decoder-layer outputs (LongReD-style)
    hidden_layers: list[int] | None = None  # layers for hidden_cosine; None = all
    backend: str = "auto"  # relation_kl backend: auto | torch | triton


@dataclass
class OptimConfig:
    """AdamW, linear warmup then cosine to min_lr_ratio × lr, gradient-norm clipping."""

    lr: float = 3e-3
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1
    max_grad_norm: float = 1.0  # 0 = no clipping (the norm is still reported)


@dataclass
class DataConfig:
    """Short-text training data (read by linearard.data / pipelines.data)."""

    source: str = str(ASSETS / "corpus")  # local jsonl(.gz) file/folder or a hub dataset id
    text_field: str = "text"
    ctx_len: int = 256  # block length; must fit the teacher's native window
    mode: str = "per_document"  # per_document | packed
    shuffle_seed: int = 0
    eval_fraction: float = 0.05  # held-out share of documents
    max_documents: int | None = None


@dataclass
class TrainConfig:
    """The plain-process training loop."""

    method: str = "ard"  # ard | cpt | logits_kd | hidden_cosine | ard+cpt (see METHODS)
    cpt_steps: int | None = None  # ard+cpt: steps of the CPT stage (None = steps // 4), part of `steps`
    init_from: str | None = None  # a checkpoint folder whose trainable weights the student starts from
    steps: int = 400  # optimizer steps
    batch_size: int = 4  # sequences per optimizer step (split into grad_accum micro-batches)
    grad_accum: int = 1
    seed: int = 0
    autocast_bf16: bool = True  # bf16 autocast on CUDA (ignored on CPU)
    compile: bool = False  # torch.compile each decoder layer's norms and MLP (fuses their elementwise work)
    checkpoint_every: int = 50  # optimizer steps between checkpoints; 0 = only at the end
    log_every: int = 1
    output_dir: str = "outputs/run"
    progress_bar: bool = True


@dataclass
class EvalConfig:
    """Evaluation of teacher / scaled / restored models (``linearard.evaluate``): perplexity and passkey
    retrieval at ``ctx_len × length_multipliers``, on the same held-out text and pass keys for every model."""

    ctx_len: int | None = None  # the native context n; None = the teacher's max_position_embeddings
    length_multipliers: list[int] = field(default_factory=lambda: [1, 2, 4])  # n, 2n, 4n
    ppl_tokens: int = 16384  # held-out tokens scored at each length (ppl_tokens // length blocks, at least 1)
    batch_size: int = 8
    passkey_depths: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])  # 1 = at the end
    passkey_trials: int = 5  # pass keys per (length, depth) cell; 0 = no passkey test
    seed: int = 0
    lm_eval_tasks: list[str] = field(default_factory=list)  # lm-evaluation-harness tasks (the `eval` extra)
    lm_eval_limit: int | None = None

    @property
    def lengths(self) -> list[int]:
        if self.ctx_len is None:
            raise ValueError("EvalConfig.ctx_len is not set (the caller resolves it from the teacher)")
        return [self.ctx_len * m for m in self.length_multipliers]


@dataclass
class TrackingConfig:
    """MLflow (pipelines.tracking)."""

    enabled: bool = True
    uri: str = "sqlite:///outputs/mlflow.db"
    experiment: str = "linearard"
    run_name: str | None = None
    registered_model_name: str | None = "linearard-restored"


@dataclass
class RayConfig:
    """Ray Train scaling (pipelines.train)."""

    address: str | None = None  # None = local Ray
    num_workers: int = 1
    use_gpu: bool = False
    resources_per_worker: dict[str, float] = field(default_factory=dict)
    max_failures: int = 0
    storage_path: str | None = None


@dataclass
class RunConfig:
    """The whole job."""

    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    ray: RayConfig = field(default_factory=RayConfig)

    # ----------------------------------------------------------------------------------------- build
    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> "RunConfig":
        """Build from a nested dict; unknown keys and wrong types raise ``ConfigError`` (no teacher check)."""
        return _build(cls, data or {}, "")

    @classmethod
    def from_yaml(cls, path: str | Path | None = None, overrides: list[str] | None = None,
                  *, check_teacher: bool = True) -> "RunConfig":
        """Load ``path`` (None = all defaults), apply ``overrides`` and validate.

        Overrides are ``--section.key value`` pairs or ``section.key=value`` items; values are parsed as YAML
        (``10``, ``1e-4``, ``[0, 2]``, ``null``). ``check_teacher`` also reads the teacher's config (cheap) to
        check the context length and layer indices against it.
        """
        data: dict[str, Any] = {}
        if path is not None:
            try:
                data = yaml.safe_load(Path(path).read_text()) or {}
            except OSError as err:
                raise ConfigError(f"cannot read config file {str(path)!r}: {err.strerror}") from None
            except yaml.YAMLError as err:
                raise ConfigError(f"config file {str(path)!r} is not valid YAML: {str(err).splitlines()[0]}") from None
            if not isinstance(data, dict):
                raise ConfigError(f"config file {str(path)!r} must hold a mapping of sections")
        for key, value in _parse_overrides(overrides or []):
            _set_dotted(data, key, value)
        cfg = cls.from_dict(data)
        if cfg.train.method != "ard":
            _choice("train.method", cfg.train.method, tuple(METHODS))
            defaults, blocks = method_preset(cfg.train.method, cfg.data.ctx_len, cfg.train.batch_size)
            cfg = cls.from_dict(_merge(_merge(data, blocks, override=True), defaults, override=False))
        cfg.validate(check_teacher=check_teacher)
        return cfg

    @property
    def uses_teacher(self) -> bool:
        """Whether a loss term reads the teacher (every term but ``lm``)."""
        return any(getattr(self.loss, key) > 0 for key in ("q", "k", "v", "logits_kd", "hidden_cosine"))

    def stages(self) -> list["RunConfig"]:
        """The training stages of ``train.method``: itself, or for ard+cpt an ARD stage then a CPT stage (each
        a full config; the CPT stage has ``train.method = "cpt"`` and starts from the ARD stage's weights)."""
        if self.train.method != "ard+cpt":
            return [self]
        ard_steps, cpt_steps = stage_steps(self)
        ard, cpt = self.to_dict(), self.to_dict()
        ard["train"].update(method="ard", steps=ard_steps, cpt_steps=None)
        defaults, blocks = method_preset("cpt", self.data.ctx_len, self.train.batch_size)
        cpt = _merge(cpt, {**defaults, **blocks}, override=True)
        cpt["train"].update(method="cpt", steps=cpt_steps, cpt_steps=None)
        return [RunConfig.from_dict(ard), RunConfig.from_dict(cpt)]

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict of every value."""
        return dataclasses.asdict(self)

    def to_yaml(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    # -------------------------------------------------------------------------------------- validate
    def validate(self, check_teacher: bool = True) -> None:
        """Raise ``ConfigError`` for the first problem found; ``check_teacher`` reads the teacher's config."""
        m, loss, opt, data, tr = self.model, self.loss, self.optim, self.data, self.train
        try:
            parse_rope_spec(m.rope)
        except RopeSpecError as err:
            raise ConfigError(f"model.rope: {err}") from None
        _choice("model.trainable", m.trainable, TRAINABLE)
        _choice("model.dtype", m.dtype, DTYPES)
        _choice("data.mode", data.mode, DATA_MODES)
        _choice("loss.backend", loss.backend, BACKENDS)
        _choice("train.method", tr.method, tuple(METHODS))
        if tr.method == "ard+cpt":
            cpt = stage_steps(self)[1]
            if not 1 <= cpt < tr.steps:
                raise ConfigError(f"train.cpt_steps must be in [1, train.steps) for ard+cpt (got {cpt})")
            if tr.batch_size % 4:
                raise ConfigError(f"train.batch_size ({tr.batch_size}) must be a multiple of 4 for ard+cpt "
                                  "(its CPT stage reads 4n-token blocks, batch / 4)")
        for key, value in (("train.steps", tr.steps), ("train.batch_size", tr.batch_size),
                           ("train.grad_accum", tr.grad_accum), ("data.ctx_len", data.ctx_len),
                           ("lora.r", self.lora.r), ("ray.num_workers", self.ray.num_workers),
                           ("train.log_every", tr.log_every)):
            if value < 1:
                raise ConfigError(f"{key} must be >= 1 (got {value})")
        if tr.batch_size % tr.grad_accum:
            raise ConfigError(f"train.batch_size ({tr.batch_size}) must be a multiple of train.grad_accum "
                              f"({tr.grad_accum})")
        for key in ("q", "k", "v", "lm", "logits_kd", "hidden_cosine"):
            if getattr(loss, key) < 0:
                raise ConfigError(f"loss.{key} must be >= 0 (got {getattr(loss, key)})")
        if not any(getattr(loss, key) > 0 for key in ("q", "k", "v", "lm", "logits_kd", "hidden_cosine")):
            raise ConfigError("loss: every term has weight 0; set at least one of q, k, v, lm, logits_kd, "
                              "hidden_cosine > 0")
        if loss.logits_kd_last_k is not None and loss.logits_kd_last_k < 1:
            raise ConfigError(f"loss.logits_kd_last_k must be >= 1 or null (got {loss.logits_kd_last_k})")
        if opt.lr <= 0:
            raise ConfigError(f"optim.lr must be > 0 (got {opt.lr})")
        if not 0 <= opt.min_lr_ratio <= 1:
            raise ConfigError(f"optim.min_lr_ratio must be in [0, 1] (got {opt.min_lr_ratio})")
        if opt.warmup_steps < 0 or opt.max_grad_norm < 0:
            raise ConfigError("optim.warmup_steps and optim.max_grad_norm must be >= 0")
        if len(opt.betas) != 2:
            raise ConfigError(f"optim.betas must have 2 values (got {opt.betas})")
        ev = self.eval
        if ev.ctx_len is not None and ev.ctx_len < 1:
            raise ConfigError(f"eval.ctx_len must be >= 1 or null (got {ev.ctx_len})")
        if not ev.length_multipliers or any(m < 1 for m in ev.length_multipliers) or \
                ev.length_multipliers != sorted(set(ev.length_multipliers)):
            raise ConfigError(f"eval.length_multipliers must be increasing integers >= 1 (got "
                              f"{ev.length_multipliers})")
        for key in ("ppl_tokens", "batch_size"):
            if getattr(ev, key) < 1:
                raise ConfigError(f"eval.{key} must be >= 1 (got {getattr(ev, key)})")
        if ev.passkey_trials < 0:
            raise ConfigError(f"eval.passkey_trials must be >= 0 (got {ev.passkey_trials})")
        if not ev.passkey_depths or any(not 0 <= d <= 1 for d in ev.passkey_depths):
            raise ConfigError(f"eval.passkey_depths must be values in [0, 1] (got {ev.passkey_depths})")
        if not 0 <= data.eval_fraction < 1:
            raise ConfigError(f"data.eval_fraction must be in [0, 1) (got {data.eval_fraction})")
        if not m.teacher:
            raise ConfigError("model.teacher is empty: give a local model path or a hub id")
        if check_teacher:
            self._validate_against_teacher()

    def _validate_against_teacher(self) -> None:
        from linearard.models import load_teacher_config  # transformers import kept off the cheap path

        m = self.model
        if not Path(m.teacher).expanduser().exists() and not _HUB_ID.fullmatch(m.teacher):
            raise ConfigError(f"model.teacher: no such model path {m.teacher!r}")
        try:
            teacher = load_teacher_config(m.teacher, revision=m.revision, trust_remote_code=m.trust_remote_code)
        except Exception as err:  # noqa: BLE001 - any load failure is the same user error
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ConfigError(f"model.teacher: cannot load the config of {m.teacher!r} ({reason})") from None
        native = int(teacher.max_position_embeddings)
        if self.data.ctx_len > native and self.uses_teacher:
            raise ConfigError(f"data.ctx_len {self.data.ctx_len} is longer than the teacher's native window "
                              f"{native} (ARD trains on short text the teacher reads natively)")
        layers = int(teacher.num_hidden_layers)
        for key in ("layers", "hidden_layers"):
            for index in getattr(self.loss, key) or []:
                if not -layers <= index < layers:
                    raise ConfigError(f"loss.{key}: layer index {index} is out of range for a teacher with "
                                      f"{layers} layers")
        if self.model.rope == NATIVE:
            return
        try:
            from linearard.rope import scaled_config
            scaled_config(teacher, m.rope)
        except (RopeSpecError, KeyError, ValueError) as err:
            raise ConfigError(f"model.rope: {err}") from None


# ------------------------------------------------------------------------------------------- helpers
def stage_steps(cfg: RunConfig) -> tuple[int, int]:
    """(ARD steps, CPT steps) of an ard+cpt run."""
    cpt = cfg.train.cpt_steps if cfg.train.cpt_steps is not None else cfg.train.steps // 4
    return cfg.train.steps - cpt, cpt


def _choice(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(allowed)}")


def _parse_overrides(items: list[str]) -> list[tuple[str, Any]]:
    """``["--a.b", "1", "c.d=x", "--e.f=2"]`` -> ``[("a.b", 1), ("c.d", "x"), ("e.f", 2)]``."""
    pairs, i = [], 0
    while i < len(items):
        item = items[i]
        key = item[2:] if item.startswith("--") else item
        if "=" in key:
            key, text = key.split("=", 1)
            i += 1
        elif item.startswith("--") and i + 1 < len(items):
            text = items[i + 1]
            i += 2
        else:
            raise ConfigError(f"bad override {item!r}: use --section.key value or section.key=value")
        if not key or "." not in key:
            raise ConfigError(f"bad override {item!r}: the key must be section.key")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            value = text
        pairs.append((key, value))
    return pairs


def _merge(data: dict[str, Any], values: dict[str, Any], *, override: bool) -> dict[str, Any]:
    """``data`` with the keys of ``values`` merged in (nested dicts merged): all of them with ``override``,
    else only those ``data`` does not set."""
    merged = dict(data)
    for key, value in values.items():
        if isinstance(value, dict) and isinstance(merged.get(key, {}), dict):
            merged[key] = _merge(merged.get(key, {}), value, override=override)
        elif override or key not in merged:
            merged[key] = value
    return merged


def _set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    node = data
    *parents, leaf = key.split(".")
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"bad override {key!r}: {part!r} is not a section")
        node = child
    node[leaf] = value


def _build(cls: type, data: Any, prefix: str) -> Any:
    where = prefix.rstrip(".") or "config"
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a mapping (got {type(data).__name__})")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"unknown key '{prefix}{unknown[0]}'; {where} has: {', '.join(sorted(names))}")
    values = {}
    for name, value in data.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            values[name] = _build(hint, value, f"{prefix}{name}.")
        else:
            values[name] = _coerce(hint, value, f"{prefix}{name}")
    return cls(**values)


def _coerce(hint: Any, value: Any, key: str) -> Any:
    """Check ``value`` against a field's type hint (int -> float allowed); raise ConfigError otherwise."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, key)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key} must be a list (got {value!r})")
        return [_coerce(args[0], v, key) for v in value]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping (got {value!r})")
        return {str(k): _coerce(args[1], v, key) for k, v in value.items()}
    if hint is float and isinstance(value, (int, str)) and not isinstance(value, bool):
        try:  # YAML reads 3e-4 (no dot) as a string
            return float(value)
        except ValueError:
            pass
    if hint is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise ConfigError(f"{key} must be {hint.__name__} (got {value!r})")
    return value
