"""The ``linearard`` console script: ``restore`` (the main job, on Ray) and ``evaluate`` (one process).

    linearard restore  [--config X.yaml] [--teacher M] [--student M|none] [--rope SPEC] [--method M]
                       [--output DIR] [--tracking-uri URI] [--address RAY] [--workers N] [--section.key value ...]
    linearard evaluate [--config X.yaml] [--teacher M] [--student M|none] [--rope SPEC]
                       [--restored M (eval.restored) | --checkpoint DIR] [--output DIR] [--tracking-uri URI]
                       [--section.key value ...]

Both resolve the config into a plan and check what the driver can (models, data, evaluation, the machine, the
tracking server) first: a bad one prints one error line and exits 2 in seconds, before anything starts or is
written; so does a restore whose output folder holds another run or is in use by another job. A run that fails
prints one line, the root cause (the traceback is in Ray's and MLflow's logs), and exits 1. What they print has
credentials in URIs redacted.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

from linearard.checkpoint import TRAINABLE
from linearard.config import METHODS, ConfigError, RunConfig, TrainConfig, redact
from linearard.plan import Plan, load_model_config, resolve

COMMANDS = {
    "restore": "restore a long-context model with LinearARD on Ray (the main job)",
    "evaluate": "evaluate a teacher, its extended model and a restored one side by side; write the report",
}
# Shortcut flags -> config keys (every other `--section.key value` passes through as an override).
SHORTCUTS = {
    "teacher": ("model.teacher", "the original model: local path or hub id"),
    "student": ("model.student", "the extended model to restore: local path or hub id; none: the teacher's "
                                 "weights extended by --rope"),
    "rope": ("model.rope", "the student's RoPE, e.g. linear:8, yarn:4"),
    "method": ("train.method", f"{' | '.join(METHODS)} (default: {TrainConfig.method})"),
    "output": ("train.output_dir", "output folder: checkpoints, report, merged model"),
    "tracking_uri": ("tracking.uri", "MLflow tracking URI"),
    "address": ("ray.address", "Ray cluster address; default: RAY_ADDRESS or a private local Ray"),
    "workers": ("ray.num_workers", "Ray Train workers"),
}


def error_line(err: BaseException) -> str:
    """``"TypeName: first line of the message"``: what a command prints for an unexpected error."""
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0] if text else ''}"


def fail(prog: str, message: str, code: int) -> int:
    """Print ``prog: error: message`` (credentials in URIs redacted) to stderr; return the exit code."""
    print(f"{prog}: error: {redact(message)}", file=sys.stderr)
    return code


def parse_plan(argv: list[str], prog: str = "linearard restore", extra: tuple[str, ...] = (),
               check_extra: Callable[[dict], None] | None = None) -> tuple[Plan, dict]:
    """Command line -> resolved ``Plan`` (raises ``ConfigError``; argparse exits 2 on unknown usage), plus the
    values of the ``extra`` flags, which ``check_extra`` sees first (flag conflicts before any model is read)."""
    parser = argparse.ArgumentParser(prog=prog, allow_abbrev=False, description="Every other --section.key "
                                     "value overrides the config (defaults: the embedded tiny model and corpus).")
    parser.add_argument("--config", help="run config YAML")
    for name, (key, text) in SHORTCUTS.items():
        parser.add_argument(f"--{name.replace('_', '-')}", help=f"{text} ({key})")
    for name in extra:
        parser.add_argument(f"--{name}")
    args, overrides = parser.parse_known_args(argv)
    for name, (key, _) in SHORTCUTS.items():
        value = getattr(args, name)
        if value is not None:
            overrides += [f"--{key}", "null" if name == "student" and value.lower() == "none" else value]
    extras = {name: getattr(args, name) for name in extra}
    if check_extra is not None:
        check_extra(extras)
    return resolve(RunConfig.from_yaml(args.config, overrides)), extras


def restore(argv: list[str], prog: str = "linearard restore") -> int:
    start = time.time()
    try:
        plan, _ = parse_plan(argv, prog)
        from pipelines.restore import check, run  # Ray and MLflow: imported for a config that resolves

        check(plan)
    except ConfigError as err:
        return fail(prog, str(err), 2)
    print(f"{prog}: {plan.models.family.describe()}", flush=True)  # what is distilled, what is skipped and why
    try:
        summary = run(plan)
    except ConfigError as err:  # the output folder refused the run: another config, or another job holds it
        return fail(prog, str(err), 2)
    except Exception as err:  # noqa: BLE001 - the traceback is in Ray's and MLflow's logs; the user gets one line
        return fail(prog, error_line(err), 1)
    report_md = plan.output.report_dir / "report.md"
    if report_md.exists():
        print(report_md.read_text())
    registered = (f"registered {summary['registered_model']} version {summary['version']}"
                  if "version" in summary else "not registered")
    print(f"{prog}: done in {time.time() - start:.0f}s: {summary['steps']} steps, model in {summary['model_dir']}, "
          f"{registered}")
    return 0


def evaluate(argv: list[str], prog: str = "linearard evaluate") -> int:
    from linearard.data import heldout_texts
    from linearard.evaluate import check_evaluation, evaluate_checkpoints, evaluate_restore
    from linearard.report import report_markdown

    def check_flags(extra: dict) -> None:
        if extra["restored"] and extra["checkpoint"]:
            raise ConfigError("give --restored (a restored model) or --checkpoint (a training checkpoint), not both")
        if extra["checkpoint"] and not (Path(extra["checkpoint"]) / TRAINABLE).exists():
            raise ConfigError(f"--checkpoint: no training checkpoint ({TRAINABLE}) in {extra['checkpoint']!r}")

    try:  # the flags are checked before the config resolves (no model read), then again with eval.restored
        plan, extra = parse_plan(argv, prog, extra=("restored", "checkpoint"), check_extra=check_flags)
        extra["restored"] = extra["restored"] or plan.config.eval.restored
        check_flags(extra)
        restored, checkpoint = extra["restored"], extra["checkpoint"]
        if restored:
            load_model_config(restored, plan.models.revision, plan.models.trust_remote_code, key="--restored")
        check_evaluation(plan)
        tracked = plan.config.user_set("tracking.uri")  # logged to MLflow only when a tracking URI is given
        if tracked:
            from pipelines import tracking

            tracking.check_server(plan.config.tracking.uri)
    except ConfigError as err:
        return fail(prog, str(err), 2)
    try:
        data = plan.config.data
        texts = heldout_texts(data.source, data.text_field, data.eval_fraction)
        if checkpoint:
            report = evaluate_restore(plan, checkpoint, texts)
        else:
            report = evaluate_checkpoints(plan, texts, restored)
        if tracked:
            run_id = tracking.open_run(plan)
            tracking.log_evaluation(plan, run_id, report)
            tracking.close_run(success=True)
    except Exception as err:  # noqa: BLE001 - one line for the user
        return fail(prog, error_line(err), 1)
    print(report_markdown(report))
    print(f"{prog}: report in {plan.output.report_dir}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        if argv and argv[0] not in ("-h", "--help"):
            print(f"linearard: error: unknown command {argv[0]!r}; expected one of: {', '.join(COMMANDS)}",
                  file=sys.stderr)
            return 2
        print("usage: linearard {restore,evaluate} [options]\n\n" + "\n".join(
            f"  {name:<9} {text}" for name, text in COMMANDS.items()) + "\n\nSee `linearard <command> --help`.")
        return 0 if argv else 2
    return {"restore": restore, "evaluate": evaluate}[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
