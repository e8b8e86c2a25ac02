"""The local harness tasks' documents: docs.jsonl beside this file, read without network."""

import json
from pathlib import Path

import datasets


def load(**_task_metadata):
    """A DatasetDict with one ``test`` split (lm_eval passes the task's metadata as keywords; unused)."""
    lines = (Path(__file__).parent / "docs.jsonl").read_text(encoding="utf-8").splitlines()
    return datasets.DatasetDict({"test": datasets.Dataset.from_list([json.loads(line) for line in lines])})
