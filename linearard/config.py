"""The run config: a dataclass tree (the schema), loaded from YAML and ``--section.key value`` overrides.

    cfg = RunConfig.from_yaml("run.yaml", ["--train.steps", "20", "loss.layers=[0,2]"])
    cfg.to_dict()  # plain dict (YAML/MLflow-ready, credentials in URIs redacted)

Loading checks what the config alone can tell: known keys, types, and each value's range. What needs the
models (the native window, layer counts, RoPE composition), the method presets and the stages are resolved
once, on the driver, by ``linearard.plan.resolve``. Every problem is a ``ConfigError`` (a ``ValueError``)
with a one-line message that names the key.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from linearard.tiny import ASSETS, bundled_extended_model_path, bundled_model_path

DTYPES = ("float32", "bfloat16", "float16")
LOSS_TERMS = ("q", "k", "v", "qk", "lm", "logits_kd", "hidden_cosine")  # the weights of LossConfig
TRAINABLE = ("lora", "qkv", "full")
DATA_MODES = ("per_document", "packed")
BACKENDS = ("auto", "torch", "triton")
# The restoring methods, each one flag (`train.method`); linearard.plan turns each into its stages and presets.
METHODS = {
    "logits_kd": "KL(teacher || student) of the next-token distributions at n, lr 1e-4 (the default: on the "
                 "bundled models it keeps what the extended model can do; docs/baselines.md)",
    "ard": "the paper's LinearARD: relation KL of Q/Q, K/K, V/V against the teacher, equal weights",
    "cpt": "continual pre-training: next-token loss on the student at 4n (batch / 4: same tokens per step)",
    "hidden_cosine": "1 - cosine of every decoder layer's output against the teacher at n (LongReD-style)",
    "ard+cpt": "ARD, then a CPT stage for train.cpt_steps of the steps (the paper's pipeline)",
}


class ConfigError(ValueError):
    """A bad run config; the message is one line and names the offending key."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


# The user-info part of any URI in a text: `http://user:pw@host` (greedy up to the last @ before the path).
_URI_CREDENTIALS = re.compile(r"\b([a-zA-Z][a-zA-Z0-9+.-]*://)[^/\s]+@")


def redact(text: str) -> str:
    """``text`` with the credentials of every URI in it replaced by ``***`` (``http://user:pw@host:5000`` ->
    ``http://***@host:5000``): a config value, or a message, as it may be logged, saved or printed."""
    return _URI_CREDENTIALS.sub(r"\1***@", text)


@dataclass
class ModelConfig:
    """Teacher and student models."""

    teacher: str = str(bundled_model_path())  # the original model: local path or hub id of a RoPE causal LM
    # The extended model to restore (local path or hub id), RoPE in its own config; None: the teacher's weights
    # extended by `rope` (position interpolation and friends without continual pre-training)
    student: str | None = str(bundled_extended_model_path())
    tokenizer: str | None = None  # defaults to `teacher`
    revision: str | None = None  # of every hub read (teacher, student, tokenizer)
    rope: str | None = None  # the student's RoPE (see linearard.rope); with `student`, an override of its own
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
    v: float = 1.0  # V/V
    qk: float = 0.0  # the attention map Q/K (teacher's softmax(Q·Kᵀ/√d) against the student's)
    layers: list[int] | None = None  # layers whose relations are distilled; None = all (negative = from the end)
    lm: float = 0.0  # next-token cross-entropy on the student
    logits_kd: float = 0.0  # KL(teacher || student) of next-token distributions
    logits_kd_last_k: int | None = None  # only the last k positions of each row; None = all
    hidden_cosine: float = 0.0  # 1 - cosine of decoder-layer outputs (LongReD-style)
    hidden_layers: list[int] | None = None  # layers for hidden_cosine; None = all
    backend: str = "auto"  # relation_kl backend: auto | torch | triton

    @property
    def reads_teacher(self) -> bool:
        """Whether a term reads the teacher (every term but ``lm``)."""
        return any(getattr(self, key) > 0 for key in ("q", "k", "v", "qk", "logits_kd", "hidden_cosine"))


@dataclass
class OptimConfig:
    """AdamW, linear warmup then cosine to min_lr_ratio × lr, gradient-norm clipping."""

    lr: float | None = None  # None: the method's (linearard.plan: METHOD_LR)
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
    ctx_len: int = 256  # block length n; must fit the teacher's native window
    mode: str = "per_document"  # per_document | packed
    shuffle_seed: int = 0
    eval_fraction: float = 0.05  # held-out share of documents
    max_documents: int | None = None  # read at most this many documents; None = all


@dataclass
class TrainConfig:
    """The training loop (``linearard.train``)."""

    method: str = "logits_kd"  # logits_kd | ard | cpt | hidden_cosine | ard+cpt (see METHODS)
    cpt_steps: int | None = None  # ard+cpt: steps of the CPT stage (None = steps // 4), part of `steps`
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
    """Evaluation (``linearard.evaluate``): perplexity and passkey retrieval at ``ctx_len × length_multipliers``,
    on the same held-out text and pass keys for every model."""

    ctx_len: int | None = None  # the native context n; None = the teacher's native window
    length_multipliers: list[int] = field(default_factory=lambda: [1, 2, 4])  # n, 2n, 4n
    ppl_tokens: int = 16384  # held-out tokens scored at each length (ppl_tokens // length blocks, at least 1)
    batch_size: int = 8
    passkey_depths: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])  # 1 = at the end
    passkey_trials: int = 5  # pass keys per (length, depth) cell; 0 = no passkey test
    seed: int = 0
    lm_eval_tasks: list[str] = field(default_factory=list)  # lm-evaluation-harness tasks read at n (`eval` extra)
    lm_eval_long_tasks: list[str] = field(default_factory=list)  # ... read at the longest length (e.g. RULER)
    lm_eval_limit: int | None = None
    restored: str | None = None  # `linearard evaluate`: a restored (merged) model beside teacher and extended

    @property
    def lengths(self) -> list[int]:
        if self.ctx_len is None:
            raise ValueError("EvalConfig.ctx_len is not set (linearard.plan resolves it from the teacher)")
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

    address: str | None = None  # None = a private local Ray; else exactly this cluster
    num_workers: int = 1
    use_gpu: bool = False
    resources_per_worker: dict[str, float] = field(default_factory=dict)
    max_failures: int = 0
    storage_path: str | None = None


@dataclass
class RunConfig:
    """The whole job. ``from_yaml``/``from_dict`` also record which keys the user set (``user_set``), so that a
    method's preset fills only the others."""

    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    ray: RayConfig = field(default_factory=RayConfig)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> "RunConfig":
        """Build from a nested dict and check every value; unknown keys, wrong types or ranges: ``ConfigError``."""
        data = data or {}
        cfg = _build(cls, data, "")
        cfg._user_keys = frozenset(_dotted_keys(data))
        cfg.check()
        return cfg

    @classmethod
    def from_yaml(cls, path: str | Path | None = None, overrides: list[str] | None = None) -> "RunConfig":
        """Load ``path`` (None = all defaults) and apply ``overrides``.

        Overrides are ``--section.key value`` pairs or ``section.key=value`` items; values are parsed as YAML
        (``10``, ``1e-4``, ``[0, 2]``, ``null``).
        """
        data: dict[str, Any] = {}
        if path is not None:
            try:
                data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
            except OSError as err:
                raise ConfigError(f"cannot read config file {str(path)!r}: {err.strerror}") from None
            except UnicodeDecodeError:
                raise ConfigError(f"config file {str(path)!r} is not UTF-8 text") from None
            except yaml.YAMLError as err:
                raise ConfigError(f"config file {str(path)!r} is not valid YAML: {str(err).splitlines()[0]}") from None
            if not isinstance(data, dict):
                raise ConfigError(f"config file {str(path)!r} must hold a mapping of sections")
        for key, value in _parse_overrides(overrides or []):
            _set_dotted(data, key, value)
        return cls.from_dict(data)

    def user_set(self, dotted_key: str) -> bool:
        """Whether the user's YAML or overrides set ``dotted_key`` (e.g. ``"loss.v"``)."""
        return dotted_key in getattr(self, "_user_keys", frozenset())

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict of every value, credentials in URIs redacted (``redact``): what is saved (config.yaml)
        and logged (MLflow params). The config itself keeps them for the run."""
        return _redacted(dataclasses.asdict(self))

    def yaml_text(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def to_yaml(self, path: str | Path) -> None:
        Path(path).write_text(self.yaml_text())

    def check(self) -> None:
        """Raise ``ConfigError`` for the first value out of its range (what the config alone can tell)."""
        m, lora, loss, opt, data, tr, ev = (self.model, self.lora, self.loss, self.optim, self.data, self.train,
                                            self.eval)
        if not m.teacher:
            raise ConfigError("model.teacher is empty: give a local model path or a hub id")
        if m.student == "":
            raise ConfigError("model.student is empty: give the extended model's path or hub id, or null")
        if m.student is None and m.rope is None:
            raise ConfigError("model.rope must be set when model.student is null (how the teacher's weights are "
                              "extended, e.g. linear:4), or give model.student")
        for key, value, allowed in (("model.trainable", m.trainable, TRAINABLE), ("model.dtype", m.dtype, DTYPES),
                                    ("data.mode", data.mode, DATA_MODES), ("loss.backend", loss.backend, BACKENDS),
                                    ("train.method", tr.method, tuple(METHODS))):
            if value not in allowed:
                raise ConfigError(f"{key}: {value!r} is not one of {', '.join(allowed)}")
        at_least = [("train.steps", tr.steps, 1), ("train.batch_size", tr.batch_size, 1),
                    ("train.grad_accum", tr.grad_accum, 1), ("train.log_every", tr.log_every, 1),
                    ("train.checkpoint_every", tr.checkpoint_every, 0), ("data.ctx_len", data.ctx_len, 2),
                    ("lora.r", lora.r, 1), ("ray.num_workers", self.ray.num_workers, 1),
                    ("ray.max_failures", self.ray.max_failures, 0), ("optim.warmup_steps", opt.warmup_steps, 0),
                    ("eval.ppl_tokens", ev.ppl_tokens, 1), ("eval.batch_size", ev.batch_size, 1),
                    ("eval.passkey_trials", ev.passkey_trials, 0)]
        at_least += [(f"loss.{key}", getattr(loss, key), 0) for key in LOSS_TERMS]
        at_least += [(key, value, 1) for key, value in (("data.max_documents", data.max_documents),
                                                        ("loss.logits_kd_last_k", loss.logits_kd_last_k),
                                                        ("eval.ctx_len", ev.ctx_len), ("eval.lm_eval_limit",
                                                                                       ev.lm_eval_limit),
                                                        ("train.cpt_steps", tr.cpt_steps)) if value is not None]
        for key, value, low in at_least:
            if not (isinstance(value, int) or math.isfinite(value)) or value < low:
                raise ConfigError(f"{key} must be a finite number >= {low} (got {value})")
        for key, value, low, high, closed in (
                ("optim.lr", 1.0 if opt.lr is None else opt.lr, 0.0, math.inf, False),
                ("optim.eps", opt.eps, 0.0, math.inf, False),
                ("optim.weight_decay", opt.weight_decay, 0.0, math.inf, True),
                ("optim.max_grad_norm", opt.max_grad_norm, 0.0, math.inf, True),
                ("optim.min_lr_ratio", opt.min_lr_ratio, 0.0, 1.0, True),
                ("lora.alpha", lora.alpha, 0.0, math.inf, False), ("lora.dropout", lora.dropout, 0.0, 1.0, None),
                ("data.eval_fraction", data.eval_fraction, 0.0, 1.0, None)):
            # closed: [low, high]; False: (low, high); None: [low, high)
            inside = (low <= value <= high if closed else low < value < high if closed is False
                      else low <= value < high)
            if not math.isfinite(value) or not inside:
                span = {True: f"[{low}, {high}]", False: f"({low}, {high})", None: f"[{low}, {high})"}[closed]
                raise ConfigError(f"{key} must be a finite number in {span.replace('inf', '∞')} (got {value})")
        if len(opt.betas) != 2 or not all(math.isfinite(b) and 0 <= b < 1 for b in opt.betas):
            raise ConfigError(f"optim.betas must be 2 numbers in [0, 1) (got {opt.betas})")
        for name, amount in self.ray.resources_per_worker.items():
            if not math.isfinite(amount) or amount < 0:
                raise ConfigError(f"ray.resources_per_worker: {name} must be a finite number >= 0 (got {amount})")
        if loss.backend == "triton" and not self.ray.use_gpu:
            raise ConfigError("loss.backend triton runs on CUDA only, and ray.use_gpu is false (the workers train on "
                              "CPU): set ray.use_gpu true, or loss.backend auto")
        if not lora.target_modules or not all(lora.target_modules):
            raise ConfigError(f"lora.target_modules must name at least one module (got {lora.target_modules})")
        if tr.batch_size % tr.grad_accum:
            raise ConfigError(f"train.batch_size ({tr.batch_size}) must be a multiple of train.grad_accum "
                              f"({tr.grad_accum})")
        if tr.method == "ard+cpt":
            cpt = tr.cpt_steps if tr.cpt_steps is not None else tr.steps // 4
            if not 1 <= cpt < tr.steps:
                raise ConfigError(f"train.cpt_steps must be in [1, train.steps) for ard+cpt (got {cpt})")
            if tr.batch_size % 4:
                raise ConfigError(f"train.batch_size ({tr.batch_size}) must be a multiple of 4 for ard+cpt "
                                  "(its CPT stage reads 4n-token blocks, batch / 4)")
        if not ev.length_multipliers or any(m < 1 for m in ev.length_multipliers) or \
                ev.length_multipliers != sorted(set(ev.length_multipliers)):
            raise ConfigError(f"eval.length_multipliers must be increasing integers >= 1 (got "
                              f"{ev.length_multipliers})")
        if not ev.passkey_depths or any(not 0 <= d <= 1 for d in ev.passkey_depths):
            raise ConfigError(f"eval.passkey_depths must be values in [0, 1] (got {ev.passkey_depths})")


# ------------------------------------------------------------------------------------------- helpers
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


def _redacted(tree: Any) -> Any:
    if isinstance(tree, dict):
        return {key: _redacted(value) for key, value in tree.items()}
    if isinstance(tree, list):
        return [_redacted(value) for value in tree]
    return redact(tree) if isinstance(tree, str) else tree


def _set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    node = data
    *parents, leaf = key.split(".")
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"bad override {key!r}: {part!r} is not a section")
        node = child
    node[leaf] = value


def _dotted_keys(data: dict[str, Any], prefix: str = "") -> list[str]:
    keys = []
    for key, value in data.items():
        keys.append(f"{prefix}{key}")
        if isinstance(value, dict) and not prefix:  # sections only: a mapping value below them is a leaf
            keys += _dotted_keys(value, f"{key}.")
    return keys


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
