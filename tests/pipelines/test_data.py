"""Ray Data: the training stream of a corpus spread over jsonl.gz, parquet and txt files, cut per document and
packed (the same invariants as the pure functions), and the same documents as the plain reader reads; its
tokenizer, like every hub read of the job, at ``model.revision``."""

from __future__ import annotations

import os
import subprocess
import sys

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


REVISION_SCRIPT = r"""
import os, shutil, sys
from pathlib import Path

cache, teacher, other = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
repo = cache / "models--linearard-test--tiny"
# Two revisions of one hub model: main has no tokenizer at all, v1 has `other`'s (another vocabulary size).
for ref, commit, tokenizer in (("main", "a" * 40, None), ("v1", "b" * 40, other)):
    snapshot = repo / "snapshots" / commit
    shutil.copytree(teacher, snapshot, ignore=shutil.ignore_patterns("tokenizer*", "special_tokens*"))
    if tokenizer is not None:
        for path in tokenizer.glob("tokenizer*"):
            shutil.copy(path, snapshot)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / ref).write_text(commit)

from linearard.config import ConfigError, RunConfig
from linearard.models import load_tokenizer
from linearard.plan import resolve
from pipelines.data import _Blocker

def plan(*revision):
    return resolve(RunConfig.from_yaml(None, ["--model.teacher", "linearard-test/tiny", "--model.student", "null",
                                              "--model.rope", "linear:4", "--data.ctx_len", "32", *revision]))

try:
    plan()
    raise SystemExit("main has no tokenizer: resolve must refuse it")
except ConfigError as err:
    assert "model.teacher: no tokenizer loads from 'linearard-test/tiny'" in str(err), err
p = plan("--model.revision", "v1")
print(len(load_tokenizer(p.models)), len(_Blocker(p.models.tokenizer, p.models.revision, 32, "packed", False).tokenizer))
"""


def test_every_hub_read_honours_model_revision(tiny_model, tmp_path):
    """A hub model from an offline cache with two revisions: resolve (config.json, tokenizer), the workers'
    tokenizer and Ray Data's tokenizer all read ``model.revision``'s files, not main's."""
    from linearard.tiny import bundled_model_path

    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", REVISION_SCRIPT, str(tmp_path / "hub"), str(tiny_model()),
                           str(bundled_model_path())], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["259", "259"]  # v1's tokenizer (the bundled one), in both places


def test_the_data_stage_fits_beside_workers_that_hold_all_cpus_but_one(ray_driver, tiny_model, corpus_files):
    """A cluster whose CPUs the training workers hold but one (a 2-core `ray start --head` and one worker) still
    streams: the read tasks and the tokenizer actor ask for a share of a CPU. Whole CPUs would wait on each other
    there forever (the actor holds the last CPU and waits for reads that cannot start)."""
    import threading

    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    from pipelines.data import block_dataset, read_documents

    held = placement_group([{"CPU": ray.cluster_resources()["CPU"] - 1}])  # what the training workers would hold
    ray.get(held.ready(), timeout=60)
    rows = []
    try:
        docs = read_documents(str(corpus_files), text_field="body")
        stream = block_dataset(docs, tokenizer=str(tiny_model("llama")), ctx_len=CTX)
        reader = threading.Thread(target=lambda: rows.extend(stream.take(2)), daemon=True)
        reader.start()
        reader.join(timeout=120)
        assert len(rows) == 2, "the data stage waited for CPUs the workers hold"
    finally:
        remove_placement_group(held)
