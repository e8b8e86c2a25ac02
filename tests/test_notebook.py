"""notebooks/walkthrough.ipynb runs from top to bottom (its cells assert their own checks: parameter counts,
logits and greedy tokens against transformers, the hand-computed window attention, a falling loss) and is
committed without outputs."""

from __future__ import annotations

import json
import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "walkthrough.ipynb"


def test_notebook_is_committed_without_outputs():
    cells = json.loads(NOTEBOOK.read_text(encoding="utf-8"))["cells"]
    code = [c for c in cells if c["cell_type"] == "code"]
    assert code and all(not c["outputs"] and c["execution_count"] is None for c in code)


@pytest.mark.slow
def test_notebook_runs(tmp_path, monkeypatch):
    # Quick training; no hub access, so the stand-in checkpoint is used wherever the suite runs.
    monkeypatch.setenv("GPT2LAB_NOTEBOOK_QUICK", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("GPT2LAB_NOTEBOOK_DIR", str(tmp_path))  # its data and run go where pytest cleans up
    src = str(Path(__file__).resolve().parents[1] / "src")  # the kernel imports this checkout's gpt2lab
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")])))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert sum("image/png" in o.get("data", {}) for o in outputs) == 2  # the attention pattern and the loss curve
