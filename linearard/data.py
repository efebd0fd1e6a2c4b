"""Tokenise long documents and cut them into fixed-length training blocks (pure Python + NumPy, no Ray).

Two cutting modes, chosen by ``data.mode`` in the config:

* ``per_document`` (the paper): every document is cut on its own into ``ctx_len`` blocks and the remainder
  (fewer than ``ctx_len`` tokens) is dropped, so a block never holds two documents.
* ``packed``: the documents of one batch are concatenated, each followed by ``eos_id``, and cut into
  ``ctx_len`` blocks; the tail of the batch that does not fill a block is dropped. Every block carries
  ``segment_ids`` (0, 1, 2, ... in reading order inside the block; the EOS belongs to the document it ends)
  so that the relation loss never relates tokens of two documents.

Ray Data calls :func:`make_blocks` inside ``map_batches`` (see ``pipelines/data.py``); the plain-process
path calls it directly. Documents come from local files or a hub dataset (``local_files`` says which files a
source holds, for both readers); ``heldout_texts`` reads the held-out documents for evaluation without Ray. A batch of blocks is a dict of NumPy arrays:
``input_ids int64[N, ctx_len]``, ``doc_index int64[N]`` (index of the block's first document in the input
batch) and, in packed mode, ``segment_ids int64[N, ctx_len]``.
"""

from __future__ import annotations

import gzip
import itertools
import json
import os
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
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


def block_batches(texts: Sequence[str], tokenizer: Any, ctx_len: int, mode: PackMode, batch_size: int,
                  seed: int) -> Iterator[dict[str, np.ndarray]]:
    """Endless training batches for a plain process: the texts cut into blocks once (``make_blocks``), then
    epoch after epoch in a seeded shuffled order, ``batch_size`` blocks each (the last partial batch of an epoch
    dropped). ``pipelines.data`` streams the same blocks through Ray Data for the cluster. Yields
    ``{"input_ids": int64[batch_size, ctx_len]}`` (and ``segment_ids`` when packed)."""
    blocks = make_blocks(texts, tokenizer, ctx_len, mode)
    blocks.pop("doc_index")
    count = len(blocks["input_ids"])
    if count < batch_size:
        raise ValueError(f"the texts give {count} blocks of {ctx_len} tokens, fewer than one batch of {batch_size}")
    rng = np.random.default_rng(seed)
    while True:
        order = rng.permutation(count)
        for start in range(0, count - batch_size + 1, batch_size):
            rows = order[start:start + batch_size]
            yield {name: values[rows] for name, values in blocks.items()}


def is_heldout(text: str, fraction: float) -> bool:
    """Whether a document belongs to the held-out split: a stable hash of its text (the same on every machine
    and run, and needing no count of the corpus, so it works on a stream) falls in the first ``fraction``."""
    return zlib.crc32(text.encode("utf-8")) % 10_000 < round(fraction * 10_000)


# File kind -> suffixes a local source is read from (in this order of kinds, each kind's files sorted).
FILE_KINDS = {
    "json": (".jsonl", ".json", ".jsonl.gz", ".json.gz"),
    "parquet": (".parquet",),
    "text": (".txt", ".txt.gz"),
}


def is_local_source(source: str) -> bool:
    """A source is local when it names an existing path (or looks like one); otherwise it is a hub dataset."""
    return os.path.exists(source) or source.startswith((".", "/", "~")) or source.endswith(
        tuple(s for suffixes in FILE_KINDS.values() for s in suffixes))


def local_files(source: str) -> dict[str, list[str]]:
    """The readable files of a local file or folder by kind (``FILE_KINDS``), each list sorted.

    Raises ``FileNotFoundError`` for a missing path and ``ValueError`` when it holds no readable file.
    """
    path = Path(source).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"data source not found: {path}")
    files = sorted(str(p) for p in (path.rglob("*") if path.is_dir() else [path]) if p.is_file())
    by_kind: dict[str, list[str]] = {kind: [] for kind in FILE_KINDS}
    for f in files:
        kind = next((k for k, suffixes in FILE_KINDS.items() if f.endswith(suffixes)), None)
        if kind:
            by_kind[kind].append(f)
    if not any(by_kind.values()):
        raise ValueError(f"no .jsonl/.json/.parquet/.txt files under {path}")
    return by_kind


def decode_text(data: bytes) -> str:
    """A ``.txt`` or ``.txt.gz`` document's text (gzip by its magic bytes; invalid UTF-8 replaced). Both readers
    decode with this."""
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    return data.decode("utf-8", errors="replace")


def read_texts(source: str, text_field: str = "text", split: str = "train") -> Iterator[str]:
    """Every document's text in reading order, without Ray: a local source's files by kind and path (the order
    ``pipelines.data.read_documents`` unions them in), or a hub dataset streamed."""
    if not is_local_source(source):
        import datasets  # optional: only hub sources need it

        for row in datasets.load_dataset(source, split=split, streaming=True):
            yield _field(row, text_field, source)
        return
    files = local_files(source)
    for path in files["json"]:
        with (gzip.open(path, "rt", encoding="utf-8") if path.endswith(".gz") else open(path, encoding="utf-8")) as f:
            for line in f:
                if line.strip():
                    yield _field(json.loads(line), text_field, path)
    if files["parquet"]:
        import pyarrow.parquet as pq

        for path in files["parquet"]:
            for batch in pq.ParquetFile(path).iter_batches(columns=[text_field]):
                yield from (str(t) for t in batch.column(0).to_pylist())
    for path in files["text"]:
        yield decode_text(Path(path).read_bytes())


def iter_heldout(source: str, text_field: str, fraction: float) -> Iterator[str]:
    """The held-out documents (``is_heldout``) in reading order, read as they are asked for; none when
    ``fraction`` is 0."""
    if fraction > 0:
        yield from (text for text in read_texts(source, text_field) if is_heldout(text, fraction))


HELDOUT_DOCUMENTS = 64  # what an evaluation reads: the first 64 held-out documents


def heldout_texts(source: str, text_field: str, fraction: float,
                  max_documents: int = HELDOUT_DOCUMENTS) -> list[str]:
    """The first ``max_documents`` held-out documents in reading order (``iter_heldout``): the same texts in
    every run, so reports compare. Empty when ``fraction`` is 0."""
    return list(itertools.islice(iter_heldout(source, text_field, fraction), max_documents))


def looks_binary(text: str) -> bool:
    """Whether a decoded document is binary data rather than text: it holds a NUL character, or more than one
    character in ten is undecodable (U+FFFD, what ``decode_text`` puts for invalid UTF-8)."""
    return "\x00" in text or text.count("\ufffd") * 10 > len(text)


def _field(row: dict[str, Any], text_field: str, where: str) -> str:
    if not isinstance(row, dict) or text_field not in row:
        fields = sorted(row) if isinstance(row, dict) else f"a {type(row).__name__}, not an object"
        raise KeyError(f"the documents of {where} have no {text_field!r} field (data.text_field); fields: {fields}")
    if row[text_field] is None:
        raise ValueError(f"a document of {where} has no text ({text_field!r} is null)")
    return str(row[text_field])


def _check_ctx_len(ctx_len: int) -> None:
    if not isinstance(ctx_len, int) or ctx_len < 1:
        raise ValueError(f"ctx_len must be a positive integer, got {ctx_len!r}")
