"""Draw docs/architecture.png: gpt2lab's rooms (subpackages and top-level modules) as boxes on their layers,
and an arrow for every room that imports another, read from the code.

The layers and the import scan are tests/test_architecture.py's own (``LAYERS``, ``NEVER``,
``scan_imports``), so the picture shows the rule the test enforces; an import against it is drawn red.

    python scripts/architecture_graph.py            # writes docs/architecture.png
    python scripts/architecture_graph.py --out x.png
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BOX_W, BOX_H, GAP_X, GAP_Y = 2.8, 1.3, 0.35, 1.15
BASE = {"errors", "files"}  # every layer may use them: arrows into them would only hide the others
LAYER_COLOURS = ["#eeeeee", "#e3eef9", "#e6f4e3", "#fff2cc", "#f9e3ee", "#ece3f9", "#e3f5f5", "#f5e9dc"]


def load_rules():
    """tests/test_architecture.py, loaded by path (it is a test module, not part of the package)."""
    spec = importlib.util.spec_from_file_location("architecture_rules", ROOT / "tests" / "test_architecture.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def room_of(module: str) -> str:
    """``gpt2lab.train.loop`` -> ``train/``; ``gpt2lab.model`` -> ``model``; the package's __init__ -> ``__init__``."""
    parts = module.split(".")[1:]
    if not parts:
        return "__init__"
    return f"{parts[0]}/" if len(parts) > 1 or (ROOT / "src" / "gpt2lab" / parts[0]).is_dir() else parts[0]


def collect(rules):
    """Rooms by layer (bottom first), each room's modules, and the arrows between rooms: (a, b) -> bad?"""
    rooms: dict[str, set[str]] = defaultdict(set)
    arrows: dict[tuple[str, str], bool] = {}
    bad = {(v.importer, v.target) for v in rules.layer_violations()}
    for path in rules.MODULES:
        name = rules.module_name(path)
        if name == "gpt2lab.__main__":
            continue  # one line that calls cli.main
        rooms[room_of(name)]  # a room of its own, even with nothing to list
        if path.name != "__init__.py" and room_of(name).endswith("/"):
            rooms[room_of(name)].add(name.rpartition(".")[2])
        for imp in rules.scan_imports(path):
            a, b = room_of(name), room_of(imp.target)
            if a != b and (b not in BASE or (name, imp.target) in bad):
                arrows[(a, b)] = arrows.get((a, b), False) or (name, imp.target) in bad
    by_layer: dict[int, list[str]] = defaultdict(list)
    order = [e for _, entries in rules.LAYERS for e in entries]
    for room in rooms:
        module = "gpt2lab" if room == "__init__" else "gpt2lab." + room.rstrip("/")
        by_layer[rules.layer_of(module)].append(room)
    for level in by_layer:
        by_layer[level].sort(key=lambda r: order.index("gpt2lab" if r == "__init__" else "gpt2lab." + r.rstrip("/")))
    return by_layer, rooms, arrows


def draw(rules, out: Path) -> None:
    by_layer, rooms, arrows = collect(rules)
    widest = max(len(v) for v in by_layer.values())
    width = widest * (BOX_W + GAP_X) + 2.6
    fig, ax = plt.subplots(figsize=(width * 0.62, len(rules.LAYERS) * (BOX_H + GAP_Y) * 0.62 + 0.6))
    centre: dict[str, tuple[float, float]] = {}
    for level, (label, _) in enumerate(rules.LAYERS):
        y = level * (BOX_H + GAP_Y)
        ax.add_patch(
            FancyBboxPatch((0, y - 0.22), width, BOX_H + 0.44, boxstyle="round,pad=0,rounding_size=0.15",
                           facecolor=LAYER_COLOURS[level % len(LAYER_COLOURS)], edgecolor="none", zorder=0)
        )  # fmt: skip
        ax.text(0.15, y + BOX_H / 2, label, ha="left", va="center", fontsize=9, style="italic", color="#555")
        names = by_layer.get(level, [])
        x0 = 2.4 + (widest - len(names)) * (BOX_W + GAP_X) / 2
        for i, room in enumerate(names):
            x = x0 + i * (BOX_W + GAP_X)
            centre[room] = (x + BOX_W / 2, y + BOX_H / 2)
            ax.add_patch(
                FancyBboxPatch((x, y), BOX_W, BOX_H, boxstyle="round,pad=0,rounding_size=0.08",
                               facecolor="white", edgecolor="#333", linewidth=1.1, zorder=3)
            )  # fmt: skip
            ax.text(x + BOX_W / 2, y + BOX_H - 0.2, room, ha="center", va="top", fontsize=9.5, weight="bold", zorder=4)
            if room.endswith("/"):
                members = _wrap(sorted(rooms[room]))
                ax.text(x + BOX_W / 2, y + BOX_H - 0.45, members, ha="center", va="top", fontsize=6.4, zorder=4)
    for (a, b), is_bad in sorted(arrows.items(), key=lambda item: item[1]):
        (xa, ya), (xb, yb) = centre[a], centre[b]
        same = abs(ya - yb) < 1e-6
        start = (xa, ya - BOX_H / 2) if not same else (xa, ya + BOX_H / 2)
        end = (xb, yb + BOX_H / 2) if ya > yb else (xb, yb - BOX_H / 2) if ya < yb else (xb, yb + BOX_H / 2)
        ax.add_patch(
            FancyArrowPatch(start, end, arrowstyle="-|>", mutation_scale=8, linewidth=1.6 if is_bad else 0.6,
                            color="#c0392b" if is_bad else "#4a6fa5", alpha=0.95 if is_bad else 0.45,
                            connectionstyle=f"arc3,rad={-0.5 if same else 0.06}", zorder=2 if not is_bad else 5)
        )  # fmt: skip
    ax.set_xlim(0, width)
    ax.set_ylim(-0.7, len(rules.LAYERS) * (BOX_H + GAP_Y) - GAP_Y + 0.5)
    ax.set_axis_off()
    n_bad = sum(arrows.values())
    title = f"gpt2lab: {len(centre)} rooms on {len(rules.LAYERS)} layers, {len(arrows)} import arrows (room to room)"
    ax.set_title(title + (f"; {n_bad} against the layer rules, in red" if n_bad else ""), fontsize=11)
    ax.text(width / 2, -0.3, "An arrow: the room at its tail imports the one at its head. Arrows into errors and "
            "files (used by every layer) are left out.", ha="center", va="top", fontsize=8, color="#555")  # fmt: skip
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def _wrap(names: list[str], width: int = 34) -> str:
    lines, line = [], ""
    for name in names:
        if line and len(line) + len(name) + 2 > width:
            lines.append(line + ",")
            line = name
        else:
            line = f"{line}, {name}" if line else name
    return "\n".join([*lines, line])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "architecture.png")
    args = parser.parse_args(argv)
    draw(load_rules(), args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
