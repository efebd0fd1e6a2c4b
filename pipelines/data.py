"""Ray Data: stream long documents, tokenise them and cut them into training blocks.

Documents come from a Hugging Face dataset by name (read streaming, PG19 for real models) or from local
``.jsonl[.gz]`` / ``.json`` / ``.parquet`` / ``.txt`` files and folders (a ``.txt`` file is one document).
Nothing is read whole into memory: Ray Data streams blocks from the source through a tokenising
``map_batches`` stage (one tokenizer per actor, loaded once) straight to the Ray Train workers
(``get_dataset_shard``), with back-pressure. Shuffling is seeded and streaming-friendly: the file order is
shuffled at read time and the workers draw from a local shuffle buffer
(``iter_torch_batches(local_shuffle_buffer_size=..., local_shuffle_seed=...)``) instead
of a global all-to-all shuffle that would have to see the whole corpus.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import ray.data

from linearard.config import RunConfig
from linearard.data import PACK_MODES, decode_text, is_heldout, is_local_source, local_files, make_blocks

# Logical CPUs of the data stage, light beside training. A cluster whose CPUs the training workers hold but one
# (a 2-core `ray start --head`, one worker) must still stream: Ray Data's file listing takes a whole CPU, so the
# tokenizer actors (alive for the whole run) ask for none and the read tasks for a share; with whole CPUs the
# actor would hold the last one and wait forever for reads that cannot start.
STAGE_CPUS = 0.25
TOKENIZER_ACTOR_CPUS = 0


def training_blocks(cfg: RunConfig, tokenizer: str, revision: str | None = None) -> ray.data.Dataset:
    """The training stream of a stage's config: documents outside the held-out split, cut into
    ``data.ctx_len`` blocks by ``tokenizer`` (a path or hub id, at ``revision``)."""
    data = cfg.data
    documents = read_documents(data.source, text_field=data.text_field, seed=data.shuffle_seed,
                               max_documents=data.max_documents)
    if data.eval_fraction > 0:
        documents = _outside_heldout(documents, data.eval_fraction)
    return block_dataset(documents, tokenizer=tokenizer, revision=revision, ctx_len=data.ctx_len, mode=data.mode,
                         trust_remote_code=cfg.model.trust_remote_code)


def read_documents(
    source: str,
    *,
    split: str = "train",
    text_field: str = "text",
    seed: int | None = None,
    max_documents: int | None = None,
) -> ray.data.Dataset:
    """A dataset with one row per document and a single ``text`` column.

    ``source`` is a local file or folder, or a Hugging Face dataset name (e.g. ``"emozilla/pg19"``), read
    with ``datasets.load_dataset(..., streaming=True)``. ``seed`` shuffles the file order (local files).
    """
    if is_local_source(source):
        ds = _read_local(source, text_field, seed)
    else:
        ds = _read_hub(source, split, text_field)
    return ds.limit(max_documents) if max_documents else ds


def block_dataset(
    documents: ray.data.Dataset,
    *,
    tokenizer: str,
    ctx_len: int,
    mode: str = "per_document",
    revision: str | None = None,
    documents_per_batch: int = 8,
    trust_remote_code: bool = False,
    tokenizer_actors: int = 1,
) -> ray.data.Dataset:
    """Tokenise and cut documents into ``ctx_len`` blocks (see :mod:`linearard.data` for the two modes).

    Rows: ``input_ids int64[ctx_len]``, ``doc_index`` and, when packed, ``segment_ids int64[ctx_len]``.
    ``documents_per_batch`` documents are tokenised together; in packed mode they are also the group that is
    packed, so the tail dropped per group is under ``ctx_len`` tokens. ``tokenizer_actors`` actors (each
    loads the tokenizer once) do the work.
    """
    if mode not in PACK_MODES:
        raise ValueError(f"unknown pack mode {mode!r}; expected one of {PACK_MODES}")
    return documents.map_batches(
        _Blocker,
        fn_constructor_kwargs={
            "tokenizer": tokenizer,
            "revision": revision,
            "ctx_len": ctx_len,
            "mode": mode,
            "trust_remote_code": trust_remote_code,
        },
        batch_size=documents_per_batch,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=tokenizer_actors),
        num_cpus=TOKENIZER_ACTOR_CPUS,
    )


class _Blocker:
    """``map_batches`` callable: loads the tokenizer once per actor, then turns document batches into blocks."""

    def __init__(self, tokenizer: str, revision: str | None, ctx_len: int, mode: str, trust_remote_code: bool) -> None:
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer, revision=revision,
                                                       trust_remote_code=trust_remote_code)
        self.ctx_len, self.mode = ctx_len, mode

    def __call__(self, batch: dict[str, np.ndarray]) -> Iterator[dict[str, np.ndarray]]:
        blocks = make_blocks([str(t) for t in batch["text"]], self.tokenizer, self.ctx_len, self.mode)
        if len(blocks["input_ids"]):  # documents shorter than a block give nothing (not an empty table)
            yield blocks


def _read_local(source: str, text_field: str, seed: int | None) -> ray.data.Dataset:
    by_kind = local_files(source)
    shuffle = ray.data.FileShuffleConfig(seed=seed) if seed is not None else None
    parts = []
    if by_kind["json"]:
        # JSON_FILE_EXTENSIONS would skip .jsonl.gz's "gz" suffix check, so we pass the files ourselves.
        ds = ray.data.read_json(by_kind["json"], lines=True, shuffle=shuffle, file_extensions=None, num_cpus=STAGE_CPUS)
        parts.append(_text_column(ds, text_field))
    if by_kind["parquet"]:
        ds = ray.data.read_parquet(by_kind["parquet"], shuffle=shuffle, num_cpus=STAGE_CPUS)
        parts.append(_text_column(ds, text_field))
    if by_kind["text"]:
        ds = ray.data.read_binary_files(by_kind["text"], shuffle=shuffle, file_extensions=None, num_cpus=STAGE_CPUS)
        # one file = one document
        parts.append(ds.map_batches(_decode_text, batch_format="numpy", num_cpus=STAGE_CPUS))
    return parts[0] if len(parts) == 1 else parts[0].union(*parts[1:])


def _read_hub(name: str, split: str, text_field: str) -> ray.data.Dataset:
    try:
        import datasets
    except ImportError as e:  # optional: only hub sources need it
        raise ImportError(
            f"reading the hub dataset {name!r} needs the `datasets` package (pip install datasets), "
            "or pass a local .jsonl/.parquet/.txt path"
        ) from e
    stream = datasets.load_dataset(name, split=split, streaming=True)
    return _text_column(ray.data.from_huggingface(stream), text_field)


def _text_column(ds: ray.data.Dataset, text_field: str) -> ray.data.Dataset:
    # Arrow out whatever the reader made (read_json(lines=True) gives pandas blocks): a union of sources, and
    # the tokenising stage after it, need one block type.
    return ds.map_batches(_select_text, fn_kwargs={"field": text_field}, batch_format="pyarrow",
                          num_cpus=STAGE_CPUS)


def _outside_heldout(documents: ray.data.Dataset, fraction: float) -> ray.data.Dataset:
    """The documents outside the held-out split (``linearard.data.is_heldout``, a text hash: a batch function,
    since Ray Data's row filters want column expressions)."""
    def keep(batch: Any) -> Any:
        import pyarrow as pa

        mask = [not is_heldout(text, fraction) for text in batch["text"].to_pylist()]
        return batch.filter(pa.array(mask, type=pa.bool_()))

    return documents.map_batches(keep, batch_format="pyarrow", num_cpus=STAGE_CPUS)


def _select_text(batch: Any, field: str) -> Any:
    import pyarrow as pa

    if field not in batch.column_names:
        raise KeyError(f"the documents have no {field!r} field (data.text_field); fields: {batch.column_names}")
    if batch[field].null_count:  # as the plain reader (linearard.data.read_texts): no "None" documents
        raise ValueError(f"a document has no text ({field!r} is null)")
    return pa.table({"text": batch[field].cast(pa.large_string())})


def _decode_text(batch: dict[str, Any]) -> Any:
    import pyarrow as pa

    return pa.table({"text": pa.array([decode_text(bytes(b)) for b in batch["bytes"]], type=pa.large_string())})
