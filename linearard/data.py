"""Tokenise long documents and cut them into fixed-length training blocks (pure Python + NumPy, no Ray).

Two cutting modes, chosen by ``data.pack`` in the config:

* ``per_document`` (the paper): every document is cut on its own into ``ctx_len`` blocks and the remainder
  (fewer than ``ctx_len`` tokens) is dropped, so a block never holds two documents.
* ``packed``: the documents of one batch are concatenated, each followed by ``eos_id``, and cut into
  ``ctx_len`` blocks; the tail of the batch that does not fill a block is dropped. Every block carries
  ``segment_ids`` (0, 1, 2, ... in reading order inside the block; the EOS belongs to the document it ends)
  so that the relation loss never relates tokens of two documents.

Ray Data calls :func:`make_blocks` inside ``map_batches`` (see ``pipelines/data.py``); the plain-process
path calls it directly. A batch of blocks is a dict of NumPy arrays:
``input_ids int64[N, ctx_len]``, ``doc_index int64[N]`` (index of the block's first document in the input
batch) and, in packed mode, ``segment_ids int64[N, ctx_len]``.
"""

from __future__ import annotations

from collections.abc import Sequence
import zlib
from typing import Any, Literal

import numpy as np

PackMode = Literal["per_document", "packed"]
PACK_MODES: tuple[str, ...] = ("per_document", "packed")


def tokenize(texts: Sequence[str], tokenizer: Any) -> list[list[int]]:
    """Token ids of each text, without special tokens (block boundaries are ours to choose, not the
    tokenizer's). ``tokenizer`` is any Hugging Face tokenizer."""
    if not texts:
        return []
    return tokenizer(list(texts), add_special_tokens=False, verbose=False)["input_ids"]


def cut_per_document(docs: Sequence[Sequence[int]], ctx_len: int) -> dict[str, np.ndarray]:
    """Cut each document into ``len(doc) // ctx_len`` blocks of ``ctx_len`` tokens; drop the remainder.

    Returns ``input_ids int64[N, ctx_len]`` and ``doc_index int64[N]`` (which document each block is from).
    """
    _check_ctx_len(ctx_len)
    blocks, owners = [], []
    for index, doc in enumerate(docs):
        n = len(doc) // ctx_len
        if n:
            blocks.append(np.asarray(doc[: n * ctx_len], dtype=np.int64).reshape(n, ctx_len))
            owners.append(np.full(n, index, dtype=np.int64))
    if not blocks:
        return {"input_ids": np.zeros((0, ctx_len), np.int64), "doc_index": np.zeros(0, np.int64)}
    return {"input_ids": np.concatenate(blocks), "doc_index": np.concatenate(owners)}


def pack_documents(docs: Sequence[Sequence[int]], ctx_len: int, eos_id: int) -> dict[str, np.ndarray]:
    """Concatenate documents (each followed by ``eos_id``) and cut into ``ctx_len`` blocks; drop the tail.

    Returns ``input_ids int64[N, ctx_len]``, ``segment_ids int64[N, ctx_len]`` (renumbered from 0 inside
    each block, so equal ids <=> same document) and ``doc_index int64[N]`` (the block's first document).
    """
    _check_ctx_len(ctx_len)
    if eos_id is None or eos_id < 0:
        raise ValueError("packed mode needs the tokenizer's eos_token_id")
    lengths = np.asarray([len(d) + 1 for d in docs], dtype=np.int64)
    n = int(lengths.sum()) // ctx_len
    if n == 0:
        empty = np.zeros((0, ctx_len), np.int64)
        return {"input_ids": empty, "segment_ids": empty.copy(), "doc_index": np.zeros(0, np.int64)}
    ids = np.empty(int(lengths.sum()), dtype=np.int64)
    start = 0
    for doc, length in zip(docs, lengths):
        ids[start : start + length - 1] = doc
        ids[start + length - 1] = eos_id
        start += length
    owner = np.repeat(np.arange(len(docs), dtype=np.int64), lengths)[: n * ctx_len].reshape(n, ctx_len)
    return {
        "input_ids": ids[: n * ctx_len].reshape(n, ctx_len),
        "segment_ids": owner - owner[:, :1],
        "doc_index": owner[:, 0].copy(),
    }


def make_blocks(
    texts: Sequence[str], tokenizer: Any, ctx_len: int, mode: PackMode = "per_document"
) -> dict[str, np.ndarray]:
    """Tokenise ``texts`` and cut them into blocks with :func:`cut_per_document` or :func:`pack_documents`."""
    docs = tokenize(texts, tokenizer)
    if mode == "per_document":
        return cut_per_document(docs, ctx_len)
    if mode == "packed":
        return pack_documents(docs, ctx_len, tokenizer.eos_token_id)
    raise ValueError(f"unknown pack mode {mode!r}; expected one of {PACK_MODES}")


def is_heldout(text: str, fraction: float) -> bool:
    """Whether a document belongs to the held-out split: a stable hash of its text (the same on every machine
    and run, and needing no count of the corpus, so it works on a stream) falls in the first ``fraction``."""
    return zlib.crc32(text.encode("utf-8")) % 10_000 < round(fraction * 10_000)


def _check_ctx_len(ctx_len: int) -> None:
    if not isinstance(ctx_len, int) or ctx_len < 1:
        raise ValueError(f"ctx_len must be a positive integer, got {ctx_len!r}")
