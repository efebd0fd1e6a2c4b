"""Ray Data: the training stream of a corpus spread over jsonl.gz, parquet and txt files, cut per document and
packed (the same invariants as the pure functions), and the same documents as the plain reader reads."""

from __future__ import annotations

import numpy as np
import pytest

from linearard.data import read_texts
from tests.linearard.test_data import CTX, EOS, LENGTHS, check_packed, check_per_document, corpus, write_corpus


@pytest.fixture(scope="module")
def corpus_files(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus"), corpus())
@pytest.mark.parametrize("mode", ["per_document", "packed"])
def test_ray_data_blocks(ray_driver, tiny_model, corpus_files, mode):
    from pipelines.data import block_dataset, read_documents

    docs = read_documents(str(corpus_files), text_field="body", seed=3)
    # 3 documents per batch: the files' order is shuffled, so we check invariants, not positions.
    rows = block_dataset(docs, tokenizer=str(tiny_model("llama")), ctx_len=CTX, mode=mode,
                         documents_per_batch=3).take_all()
    ids = np.stack([r["input_ids"] for r in rows])
    if mode == "per_document":
        check_per_document(ids)
    else:
        seg = np.stack([r["segment_ids"] for r in rows])
        check_packed(ids, seg)
        # Each group of 3 documents drops less than one block of tail.
        total = sum(LENGTHS) + len(LENGTHS)
        assert total // CTX - 4 <= len(ids) <= total // CTX
        # Every token of a block, EOS aside, comes from the documents: no token is invented or lost in a block.
        assert set(np.unique(ids)) <= {EOS} | {i + 2 for i in range(len(LENGTHS))}


def test_read_documents_errors(ray_driver, tmp_path):
    from pipelines.data import read_documents

    with pytest.raises(FileNotFoundError):
        read_documents(str(tmp_path / "missing.jsonl"))
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="no .jsonl"):
        read_documents(str(tmp_path))


def test_ray_data_reads_what_the_plain_reader_reads(ray_driver, corpus_files):
    """The same documents with the same texts (so the held-out split evaluation reads without Ray is exactly the
    one training leaves out); Ray's union of file kinds interleaves them, and training shuffles anyway."""
    from pipelines.data import read_documents

    rows = read_documents(str(corpus_files), text_field="body").take_all()
    assert sorted(row["text"] for row in rows) == sorted(read_texts(str(corpus_files), "body"))
