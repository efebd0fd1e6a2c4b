"""The ``linearard`` console script.

    linearard restore  [--config X.yaml] [--model M] [--rope SPEC] [--output DIR] [--tracking-uri URI] ...
    linearard evaluate [--config X.yaml] [--checkpoint DIR] [--output DIR] ...

``linearard restore`` is ``python -m pipelines.restore``; ``linearard evaluate`` is ``python -m
pipelines.evaluate``. Both take any ``--section.key value`` config override.
"""

from __future__ import annotations

import sys

COMMANDS = {
    "restore": "restore a RoPE-scaled model with LinearARD on Ray (the main job)",
    "evaluate": "evaluate teacher / scaled / restored on held-out text and write the report",
}


def error_line(err: BaseException) -> str:
    """``"TypeName: first line of the message"``: what a command prints for an unexpected error (the traceback is
    in Ray's and MLflow's logs)."""
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0] if text else ''}"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        usage = "usage: linearard {restore,evaluate} [options]\n\n" + "\n".join(
            f"  {name:<9} {text}" for name, text in COMMANDS.items())
        if argv and argv[0] not in ("-h", "--help"):
            print(f"linearard: error: unknown command {argv[0]!r}; expected one of: {', '.join(COMMANDS)}",
                  file=sys.stderr)
            return 2
        print(usage + "\n\nSee `linearard <command> --help`.")
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "restore":
        from pipelines.restore import main as restore

        return restore(rest, prog="linearard restore")
    from pipelines.evaluate import main as evaluate

    return evaluate(rest)


if __name__ == "__main__":
    sys.exit(main())
