"""Rebuild the data of the bundled lm-evaluation-harness tasks (``linearard/assets/lm_eval/*.jsonl``)::

    python scripts/build_lm_eval_tasks.py

- ``passkey_mc.jsonl``: 40 passkey prompts of exactly n = 256 bytes (the bundled model's native window, byte
  tokenizer: a byte is a token), made by ``linearard.evaluate.passkey_example`` (the format the model was
  pretrained on), needle depths 0, 0.25, 0.5, 0.75, 1 in turn; four 5-digit keys to choose from, one right.
- ``stdlib_code.jsonl``: 32 snippets of whole lines (100-240 ASCII bytes, so that each fits one 256-token
  window) from the held-out ``eval`` split of the bundled corpus, never seen in pretraining.

Deterministic (seed 0): a rerun writes the same bytes.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from transformers import AutoTokenizer

from linearard.evaluate import passkey_example
from linearard.tiny import ASSETS, bundled_corpus_records, bundled_model_path

OUT = ASSETS / "lm_eval"
PASSKEY_LENGTH = 256
PASSKEY_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
PASSKEY_EXAMPLES = 40
CODE_SNIPPETS = 32
CODE_BYTES = (100, 240)


def passkey_rows(rng: random.Random) -> list[dict]:
    """``{"context", "choices": [4 keys], "label"}``: the context ends with "The pass key is"; lm-eval scores
    each choice as the continuation " <key>" (its default target delimiter is a space)."""
    tokenizer = AutoTokenizer.from_pretrained(bundled_model_path())
    rows = []
    for i in range(PASSKEY_EXAMPLES):
        key = rng.randint(10000, 99999)
        ids, answer_len = passkey_example(tokenizer, PASSKEY_LENGTH, PASSKEY_DEPTHS[i % len(PASSKEY_DEPTHS)], key)
        context = tokenizer.decode(ids[:-answer_len].tolist())
        assert tokenizer.decode(ids.tolist()) == f"{context} {key}", "the byte tokenizer round-trips"
        choices = [key]
        while len(choices) < 4:
            other = rng.randint(10000, 99999)
            if other not in choices:
                choices.append(other)
        rng.shuffle(choices)
        rows.append({"context": context, "choices": [str(c) for c in choices], "label": choices.index(key)})
    return rows


def code_rows(rng: random.Random) -> list[dict]:
    """``{"source", "text"}``: whole lines from a random start in each held-out ``.py`` file in turn."""
    files = [r for r in bundled_corpus_records("eval") if r["source"].endswith(".py") and r["text"].isascii()]
    rows = []
    while len(rows) < CODE_SNIPPETS:
        record = files[len(rows) % len(files)]
        lines = record["text"].splitlines(keepends=True)
        start = rng.randrange(len(lines))
        text = ""
        for line in lines[start:]:
            if len(text) + len(line) > CODE_BYTES[1]:
                break
            text += line
        if len(text) >= CODE_BYTES[0] and text.strip() and text not in (r["text"] for r in rows):
            rows.append({"source": record["source"], "text": text})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row, ensure_ascii=True) + "\n" for row in rows), encoding="utf-8")
    print(f"{path}: {len(rows)} rows")


def main() -> None:
    rng = random.Random(0)
    write_jsonl(OUT / "passkey_mc.jsonl", passkey_rows(rng))
    write_jsonl(OUT / "stdlib_code.jsonl", code_rows(rng))


if __name__ == "__main__":
    main()
