"""Data of the bundled lm-eval tasks, read from the jsonl files beside this file.

The task YAMLs name ``load`` as their ``custom_dataset`` (``!function data.load``): lm-eval resolves that next
to the YAML, so the files are found wherever the package is installed, offline, with no dataset cache (a
``data_files`` path in a YAML would be resolved against the working directory instead).
"""

import json
from pathlib import Path

import datasets


def load(file: str, **_metadata) -> datasets.DatasetDict:
    """``{"test": Dataset}`` of the rows of ``file`` (a jsonl name here). lm-eval also passes the task's
    ``metadata`` (``version``, ...) as keyword arguments: not needed."""
    with open(Path(__file__).with_name(file), encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})
