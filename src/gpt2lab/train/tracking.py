"""Experiment tracking: the rows of ``metrics.jsonl``, also sent to TensorBoard, Weights & Biases or a CSV file.

``[run] log_to = ["tensorboard", "wandb", "csv"]`` (or ``gpt2lab train --log-to tensorboard,wandb``) picks
any of them. Each receives every finite number of every row the run logs (loss, lr, grad_norm,
tokens_per_s, mfu where the GPU's peak is known, train/val loss, HellaSwag accuracies...) under the row's
own step, so the curves are those of ``metrics.jsonl``; a non-finite value (a diverged loss) is left out,
as ``metrics.jsonl`` writes it as null. The run's config is logged once as hyperparameters.

A resumed run continues the same curves:

* **TensorBoard** writes to ``RUN/tensorboard`` again with ``purge_step`` = the checkpoint's step + 1, so
  the points a crash left past the checkpoint are dropped by TensorBoard's reader.
* **W&B** resumes the run whose id the first start stored in ``RUN/wandb_run_id``. W&B runs offline (files
  under ``RUN/wandb``, ``wandb sync`` uploads them) unless the user set ``WANDB_MODE``; the project is
  ``WANDB_PROJECT`` or ``gpt2lab``. W&B's history only grows: steps a crash logged past the checkpoint
  stay in it (the resumed run logs them again later; W&B keeps the first).
* **CSV** (``RUN/metrics.csv``, one ``step,metric,value`` line per number) drops the rows past the
  checkpoint, as ``metrics.jsonl`` does.

The packages are optional extras (``pip install 'gpt2lab[tensorboard]'`` / ``'gpt2lab[wandb]'``); a missing
one is one error line before the run starts.
"""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import math
import os
import secrets
from pathlib import Path
from typing import Any

from gpt2lab.errors import GPT2LabError, closest_hint
from gpt2lab.files import one_line, write_text
from gpt2lab.outputs import CSV_NAME, TENSORBOARD_DIR, WANDB_ID_FILE

__all__ = ["TRACKERS", "Trackers", "check_log_to", "hyperparameters"]

TRACKERS = ("tensorboard", "wandb", "csv")
CSV_HEADER = ["step", "metric", "value"]
_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}  # tracker -> the module it needs (= the extra)


def check_log_to(log_to: Any) -> list[str]:
    """``log_to`` as a list of distinct tracker names whose packages are installed, or one error line."""
    if not isinstance(log_to, list) or not all(isinstance(name, str) for name in log_to):
        raise GPT2LabError(f"config: log_to must be a list of names ({', '.join(TRACKERS)}), got {log_to!r}")
    for name in log_to:
        if name not in TRACKERS:
            raise GPT2LabError(
                f"config: log_to: unknown tracker {name!r}{closest_hint(name, TRACKERS)}; known: {', '.join(TRACKERS)}"
            )
        module = _PACKAGES.get(name)
        if module and importlib.util.find_spec(module) is None:
            raise GPT2LabError(f"log_to {name} needs the {module} package: pip install 'gpt2lab[{module}]'")
    return list(dict.fromkeys(log_to))


def scalars(row: dict[str, Any]) -> dict[str, float]:
    """The finite numbers of a metrics row, without its step."""
    return {
        key: value
        for key, value in row.items()
        if key != "step" and isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    }


def hyperparameters(config: dict[str, Any], prefix: str = "") -> dict[str, int | float | str | bool]:
    """``config`` flattened to the plain values trackers take: nested tables as ``model.n_layer``, lists and
    None as JSON text (``[256, null]``, ``null``)."""
    flat: dict[str, int | float | str | bool] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat |= hyperparameters(value, f"{name}.")
        elif isinstance(value, bool | int | float | str):
            flat[name] = value
        else:
            flat[name] = json.dumps(value)
    return flat


class Trackers:
    """The trackers of one run (rank 0 only): :meth:`log` each metrics row, :meth:`close` at the end.

    ``resume_step`` is the checkpoint step a resumed run continues from (None: a fresh run).
    """

    def __init__(
        self, names: list[str], run_dir: Path, config: dict, run_name: str | None, resume_step: int | None
    ) -> None:
        makers = {"tensorboard": _TensorBoard, "wandb": _WandB, "csv": _CSV}
        run_dir = Path(run_dir)
        self.trackers = []
        try:
            for name in check_log_to(names):
                self.trackers.append(makers[name](run_dir, config, run_name or run_dir.name, resume_step))
        except BaseException:
            self.close()
            raise

    def log(self, row: dict[str, Any]) -> None:
        values = scalars(row)
        if values:
            for tracker in self.trackers:
                tracker.log(int(row["step"]), values)

    def close(self) -> None:
        while self.trackers:
            self.trackers.pop().close()


class _TensorBoard:
    """TensorBoard event files in ``RUN/tensorboard``, written by PyTorch's SummaryWriter."""

    def __init__(self, run_dir: Path, config: dict, run_name: str, resume_step: int | None) -> None:
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams

        purge = None if resume_step is None else resume_step + 1  # the rows up to the checkpoint stay
        self.writer = SummaryWriter(log_dir=str(run_dir / TENSORBOARD_DIR), purge_step=purge)
        if resume_step is None:
            # In the run's own folder (SummaryWriter.add_hparams would make a sub-run), so the HParams
            # dashboard shows these values beside this run's curves; val_loss is the metric it lists.
            file_writer = self.writer._get_file_writer()
            for summary in hparams(hyperparameters(config), {"val_loss": float("nan")}):
                file_writer.add_summary(summary)

    def log(self, step: int, values: dict[str, float]) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        self.writer.close()


class _WandB:
    """A Weights & Biases run in ``RUN/wandb``, offline unless ``WANDB_MODE`` says otherwise."""

    def __init__(self, run_dir: Path, config: dict, run_name: str, resume_step: int | None) -> None:
        import wandb

        id_file = run_dir / WANDB_ID_FILE
        run_id = id_file.read_text(encoding="utf-8").strip() if id_file.is_file() else ""
        if resume_step is None or not run_id:
            run_id = secrets.token_hex(4)  # 8 characters, as W&B's own ids
            write_text(id_file, run_id + "\n")
        try:
            self.run = wandb.init(
                project=os.environ.get("WANDB_PROJECT", "gpt2lab"),
                name=run_name,
                id=run_id,
                resume="allow",
                dir=str(run_dir),
                config=config,
                mode=None if os.environ.get("WANDB_MODE") else "offline",
            )
        except Exception as err:  # wandb raises its own errors (no network, not logged in, ...)
            raise GPT2LabError(f"log_to wandb: W&B could not start the run: {one_line(str(err))}") from err

    def log(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


class _CSV:
    """``RUN/metrics.csv``: one ``step,metric,value`` line per number (metrics differ from row to row)."""

    def __init__(self, run_dir: Path, config: dict, run_name: str, resume_step: int | None) -> None:
        self.path = run_dir / CSV_NAME
        kept = []
        if resume_step is not None and self.path.is_file():
            with open(self.path, newline="", encoding="utf-8") as f:
                kept = [r for r in list(csv.reader(f))[1:] if len(r) == 3 and _step(r[0]) <= resume_step]
        text = io.StringIO()
        csv.writer(text, lineterminator="\n").writerows([CSV_HEADER, *kept])
        write_text(self.path, text.getvalue())
        self.file = open(self.path, "a", newline="", encoding="utf-8")  # noqa: SIM115 (open for the whole run)
        self.writer = csv.writer(self.file, lineterminator="\n")

    def log(self, step: int, values: dict[str, float]) -> None:
        try:
            self.writer.writerows([step, key, repr(value)] for key, value in values.items())
            self.file.flush()
        except OSError as err:
            raise GPT2LabError(f"cannot append to {self.path}: {err.strerror or err}") from err

    def close(self) -> None:
        self.file.close()


def _step(text: str) -> float:
    """A step cell; a torn last line (a crash mid-write) reads as past every checkpoint, so it is dropped."""
    try:
        return int(text)
    except ValueError:
        return math.inf
