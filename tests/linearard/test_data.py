"""Cutting documents into blocks, and reading a source's documents without Ray (the held-out texts).

Every document of the test corpus is one repeated word (document i = word ``w{i+2}``, token id i + 2), so a
block's token ids tell which documents it holds: per-document blocks must be uniform, and in packed blocks the
segment ids must change exactly where the document does (after its EOS).
"""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest

from linearard.data import cut_per_document, heldout_texts, is_heldout, make_blocks, pack_documents, read_texts

CTX = 8
EOS = 1
LENGTHS = [3, 8, 21, 16, 5, 30, 9, 12, 40, 7]  # tokens per document


def corpus() -> list[str]:
    return [" ".join([f"w{i + 2}"] * n) for i, n in enumerate(LENGTHS)]


def check_per_document(input_ids: np.ndarray, lengths=LENGTHS) -> None:
    assert input_ids.shape == (sum(n // CTX for n in lengths), CTX)
    assert (input_ids == input_ids[:, :1]).all(), "a per-document block holds one document only"
    owners, counts = np.unique(input_ids[:, 0] - 2, return_counts=True)
    assert dict(zip(owners.tolist(), counts.tolist())) == {i: n // CTX for i, n in enumerate(lengths) if n >= CTX}


def check_packed(input_ids: np.ndarray, segment_ids: np.ndarray) -> None:
    """Segment ids change exactly at document boundaries; an EOS closes each document's segment."""
    for ids, seg in zip(input_ids, segment_ids):
        assert seg[0] == 0 and (np.diff(seg) >= 0).all() and (np.diff(seg) <= 1).all()
        doc = ids.copy()  # the EOS belongs to the document it ends: give it that document's word
        for t in range(len(ids)):
            if ids[t] == EOS:
                doc[t] = doc[t - 1] if t > 0 else -1
        starts = np.flatnonzero(np.diff(seg)) + 1
        assert all(ids[s - 1] == EOS for s in starts), "a new segment starts right after an EOS"
        for s in np.unique(seg):
            words = set(doc[seg == s].tolist()) - {-1}
            # one segment = one document (or only the EOS that closes a document begun in the last block)
            assert len(words) == 1 or (s == 0 and ids[0] == EOS and (seg == 0).sum() == 1)
        assert len({int(doc[seg == s][-1]) for s in np.unique(seg)}) == len(np.unique(seg)), "documents differ"


# --------------------------------------------------------------------------------------------- pure functions
def test_cut_per_document_drops_remainders():
    docs = [list(range(n)) for n in (3, 8, 21)]
    out = cut_per_document(docs, CTX)
    assert out["input_ids"].tolist() == [list(range(8)), list(range(8)), list(range(8, 16))]
    assert out["doc_index"].tolist() == [1, 2, 2]
    assert cut_per_document([[1, 2]], CTX)["input_ids"].shape == (0, CTX)


def test_pack_documents_eos_and_segments():
    docs = [[5] * 3, [6] * 8, [7] * 9]  # 4 + 9 + 10 = 23 tokens with EOS -> 2 blocks, 7 dropped
    out = pack_documents(docs, CTX, EOS)
    assert out["input_ids"].tolist() == [[5, 5, 5, 1, 6, 6, 6, 6], [6, 6, 6, 6, 1, 7, 7, 7]]
    assert out["segment_ids"].tolist() == [[0, 0, 0, 0, 1, 1, 1, 1], [0, 0, 0, 0, 0, 1, 1, 1]]
    assert out["doc_index"].tolist() == [0, 1]
    with pytest.raises(ValueError, match="eos"):
        pack_documents(docs, CTX, None)


def test_make_blocks_with_a_tokenizer(tiny_model):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model("llama"))
    assert tokenizer.eos_token_id == EOS
    check_per_document(make_blocks(corpus(), tokenizer, CTX, "per_document")["input_ids"])
    packed = make_blocks(corpus(), tokenizer, CTX, "packed")
    assert len(packed["input_ids"]) == (sum(LENGTHS) + len(LENGTHS)) // CTX
    check_packed(packed["input_ids"], packed["segment_ids"])
    with pytest.raises(ValueError, match="pack mode"):
        make_blocks(corpus(), tokenizer, CTX, "sliding")


def test_heldout_split_is_stable_and_proportional():
    texts = [f"document {i}" for i in range(4000)]
    held = [t for t in texts if is_heldout(t, 0.1)]
    assert 300 < len(held) < 500
    assert held == [t for t in texts if is_heldout(t, 0.1)]
    assert not any(is_heldout(t, 0.0) for t in texts)


def write_corpus(root, texts):
    """The corpus split over a .jsonl.gz file (field "body"), a parquet file and a folder of .txt files."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    with gzip.open(root / "a.jsonl.gz", "wt") as f:
        for text in texts[:4]:
            f.write(json.dumps({"body": text, "id": 0}) + "\n")
    pq.write_table(pa.table({"body": texts[4:7]}), root / "b.parquet")
    (root / "books").mkdir()
    for i, text in enumerate(texts[7:]):
        (root / "books" / f"{i}.txt").write_text(text)
    return root


def test_read_texts_in_reading_order(tmp_path):
    texts = corpus()
    write_corpus(tmp_path, texts)
    (tmp_path / "books" / "z.txt.gz").write_bytes(gzip.compress("zipped text".encode()))
    assert list(read_texts(str(tmp_path), "body")) == texts + ["zipped text"]
    with pytest.raises(KeyError, match="no 'text' field"):
        list(read_texts(str(tmp_path)))


def test_heldout_texts_are_the_first_heldout_documents_in_reading_order(tmp_path):
    texts = [f"document {i} " + "x" * (i % 7) for i in range(400)]
    for part in range(4):  # several files, read in order
        with open(tmp_path / f"part-{part}.jsonl", "w") as f:
            f.writelines(json.dumps({"text": t}) + "\n" for t in texts[part * 100:(part + 1) * 100])
    expected = [t for t in texts if is_heldout(t, 0.2)][:10]
    assert len(expected) == 10
    assert heldout_texts(str(tmp_path), "text", 0.2, max_documents=10) == expected
    assert heldout_texts(str(tmp_path), "text", 0.0) == []
