"""The bundled tiny model and corpus: where they are and how to read them.

Both ship inside the package (``linearard/assets/``) so that the embedded default runs offline and every
machine sees the same weights and the same text. ``scripts/build_tiny_model.py`` rebuilds them; see
``docs/tiny-model.md`` for what they are and the numbers they give.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

ASSETS = Path(__file__).resolve().parent / "assets"
SPLITS = ("train", "eval")


def bundled_model_path() -> Path:
    """Folder of the bundled tiny Llama (HF format: ``config.json``, ``model.safetensors``, tokenizer files).

    Pass it to ``AutoModelForCausalLM.from_pretrained`` / ``AutoTokenizer.from_pretrained``; it loads offline.
    """
    return ASSETS / "tiny-llama"


def bundled_extended_model_path() -> Path:
    """Folder of the bundled extended model: the bundled tiny Llama with RoPE ×4 and continual pre-training at
    4n (``scripts/build_extended_model.py``), which reads at 4n and has lost some short-text ability at n."""
    return ASSETS / "tiny-llama-4x"


def bundled_corpus_path(split: str) -> Path:
    """Path of one split of the bundled corpus (``train`` or ``eval``, gzipped JSON lines)."""
    if split not in SPLITS:
        raise ValueError(f"unknown corpus split {split!r}; expected one of {SPLITS}")
    return ASSETS / "corpus" / f"{split}.jsonl.gz"


def bundled_corpus_records(split: str) -> list[dict[str, str]]:
    """Documents of one split as ``{"source": "stdlib/json/decoder.py", "text": ...}`` records, in file order."""
    with gzip.open(bundled_corpus_path(split), "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def bundled_corpus(split: str) -> list[str]:
    """Texts of one split of the bundled corpus (Python standard library sources and pydoc topics).

    ``eval`` holds whole files never seen in pretraining; use it for held-out perplexity.
    """
    return [record["text"] for record in bundled_corpus_records(split)]
