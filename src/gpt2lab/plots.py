"""PNG plots: the training loss curve, loss by position in the context, and the figure boilerplate the
study's plots share. Figures are drawn on matplotlib's Agg canvas (no display needed) and written
through :func:`gpt2lab.files.atomic_file`."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from gpt2lab.files import atomic_file

if TYPE_CHECKING:
    from matplotlib.axes import Axes


@contextmanager
def plot_file(
    path: str | Path, size: tuple[float, float] = (7, 4), dpi: int = 100, panels: int = 1, grid: str = "major"
) -> Iterator[list[Axes]]:
    """Yield ``panels`` axes side by side; on exit grid them, lay the figure out and write ``path``."""
    from matplotlib.figure import Figure  # imported when a plot is drawn: it takes a while

    fig = Figure(figsize=size)
    axes = [fig.add_subplot(1, panels, i + 1) for i in range(panels)]
    yield axes
    for ax in axes:
        ax.grid(alpha=0.3, which=grid)
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png")


def plot_losses(rows: list[dict[str, Any]], png_path: str | Path) -> None:
    """Training and validation loss against step, from the rows of a run's metrics log."""
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    with plot_file(png_path) as (ax,):
        if train:
            ax.plot(*zip(*train, strict=True), label="train", lw=1)
        if val:
            ax.plot(*zip(*val, strict=True), "o-", label="val")
        ax.set_xlabel("step")
        ax.set_ylabel("loss (nats/token)")
        ax.legend()


def plot_loss_by_position(by_position: np.ndarray, png_path: str | Path, trained_context: int | None = None) -> None:
    """Mean loss at each position of the window (log x axis); a dashed line marks a shorter trained context."""
    with plot_file(png_path) as (ax,):
        ax.plot(np.arange(len(by_position)), by_position, lw=1)
        if trained_context is not None and trained_context < len(by_position):
            ax.axvline(trained_context, ls="--", color="gray", label=f"trained context ({trained_context})")
            ax.legend()
        ax.set_xscale("symlog", linthresh=10)
        ax.set_xlabel("position in context")
        ax.set_ylabel("loss (nats/token)")
