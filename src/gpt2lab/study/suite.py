"""A variant study's suite (TOML, with ``--set`` overrides) and the small helpers that the study's runs
(:mod:`gpt2lab.study.run`) and its report (:mod:`gpt2lab.study.report`) share: grouping runs, the CSVs."""

from __future__ import annotations

import csv
import dataclasses
from pathlib import Path
from typing import Any

from gpt2lab.config import GPT2_VOCAB_SIZE, GPTConfig
from gpt2lab.errors import GPT2LabError, closest_hint
from gpt2lab.files import atomic_file
from gpt2lab.train.config import TRAIN_FIELDS, parse_set, read_toml, upgrade_train_fields

SUITE_TABLES = ("model", "train", "eval", "uptrain", "probe", "extrapolation", "cost")
SUITE_SECTIONS = {"name", "data", "tokenizer", "seeds", "parallel", "variants", *SUITE_TABLES}
VARIANT_KEYS = ("name", "compare_to")  # a variant's keys that are not GPTConfig fields


@dataclasses.dataclass
class Suite:
    name: str
    data: str
    tokenizer: str  # how the study prepares its data: "gpt2" (BPE) or "char"
    seeds: list[int]
    parallel: int  # runs trained at once, each on an equal share of the CPU threads
    model: dict[str, Any]
    train: dict[str, Any]
    variants: list[dict[str, Any]]
    eval: dict[str, Any]
    uptrain: dict[str, Any] | None
    probe: dict[str, Any] | None
    extrapolation: dict[str, Any] | None
    cost: dict[str, Any]
    overrides: list[str] = dataclasses.field(default_factory=list)  # the --set items applied to the file
    source: str = ""  # the suite file, as given

    def variant_config(self, variant: dict[str, Any], vocab_size: int = GPT2_VOCAB_SIZE) -> GPTConfig:
        fields = {k: v for k, v in variant.items() if k not in VARIANT_KEYS}
        return GPTConfig.from_dict({"vocab_size": vocab_size, **self.model, **fields})

    def reference_of(self, variant: dict[str, Any]) -> str:
        """The variant a variant's paired differences are taken against (``compare_to``, else the baseline)."""
        return variant.get("compare_to", "baseline")

    def fingerprint(self) -> dict[str, Any]:
        """Everything that decides what the runs compute: a study folder holds the runs of one fingerprint."""
        return {
            k: getattr(self, k)
            for k in ("data", "tokenizer", "model", "train", "variants", "eval", "uptrain", "probe", "extrapolation")
        }


def receptive_reach(config: GPTConfig) -> int | None:
    """How many tokens back the last layer can see through stacked windows, or None (unlimited).

    Layer i with window W_i (query included) adds W_i - 1 tokens of reach, so a token at distance d can
    reach a query iff d <= sum(W_i - 1) (n_layer * (W - 1) for one W). One formula, used everywhere.
    """
    windows = config.layer_windows()
    if any(w is None for w in windows):
        return None
    return sum(w - 1 for w in windows)


def _apply_overrides(doc: dict[str, Any], overrides: list[str]) -> None:
    """``--set table.key=value`` sets a key of one of the suite's tables, ``--set key=value`` a top-level key."""
    for item in overrides:
        section, key, value = parse_set(item)
        if section is None and key not in SUITE_TABLES and key != "variants":
            doc[key] = value  # checked below with the file's own keys
        elif section in SUITE_TABLES:
            doc.setdefault(section, {})[key] = value
        else:
            raise GPT2LabError(
                f"--set {item!r}: name a key of one of the suite's tables ({', '.join(SUITE_TABLES)}), "
                "e.g. train.max_iters=10, or a top-level key (name, data, seeds, parallel)"
            )


def _check(doc: dict[str, Any], path: Path) -> None:
    for key in doc:
        if key not in SUITE_SECTIONS:
            raise GPT2LabError(f"{path}: unknown key '{key}'{closest_hint(key, SUITE_SECTIONS)}")
    for key in doc.get("train", {}):  # TrainConfig fields: a typo fails now, not in a run an hour later
        if key not in TRAIN_FIELDS:
            raise GPT2LabError(f"{path}: unknown [train] key '{key}'{closest_hint(key, TRAIN_FIELDS)}")
    variants = doc.get("variants", [])
    names = [v.get("name") for v in variants]
    if not variants or None in names or len(set(names)) != len(names):
        raise GPT2LabError(f"{path}: needs [[variants]] with unique names")
    if names[0] != "baseline":
        raise GPT2LabError(f"{path}: the first variant must be the 'baseline' the others are compared with")
    for v in variants:
        if v.get("compare_to", "baseline") not in names:
            raise GPT2LabError(f"{path}: variant {v['name']!r} compares to {v['compare_to']!r}, which is no variant")
    unknown = [n for n in doc.get("probe", {}).get("variants", []) if n not in names]
    if unknown:
        raise GPT2LabError(f"{path}: [probe] variants {unknown} are not variants of the suite")
    if doc.get("tokenizer", "gpt2") not in ("gpt2", "char"):
        raise GPT2LabError(f"{path}: tokenizer must be 'gpt2' or 'char', got {doc['tokenizer']!r}")
    if len(doc.get("seeds", [1])) < 1:
        raise GPT2LabError(f"{path}: seeds must list at least one seed")


def load_suite(path: str | Path, data: str | None = None, overrides: list[str] | None = None) -> Suite:
    """The suite in ``path``, its tables updated by ``--set`` ``overrides``; ``data`` replaces its data."""
    path = Path(path)
    if not path.is_file():
        raise GPT2LabError(f"no such suite file: {path}")
    doc = read_toml(path)
    _apply_overrides(doc, overrides or [])
    if isinstance(doc.get("train"), dict):
        doc["train"] = upgrade_train_fields(doc["train"], str(path))
    _check(doc, path)
    suite = Suite(
        name=doc.get("name", path.stem),
        data=data or doc.get("data", "shakespeare"),
        tokenizer=doc.get("tokenizer", "gpt2"),
        seeds=list(doc.get("seeds", [1])),
        parallel=int(doc.get("parallel", 1)),
        model=doc.get("model", {}),
        train=doc.get("train", {}),
        variants=doc["variants"],
        eval={"max_tokens": None, "early_positions": 8, "context_targets": 1024, **doc.get("eval", {})},
        uptrain=doc.get("uptrain"),
        probe=doc.get("probe"),
        extrapolation=doc.get("extrapolation"),
        cost={"benchmarks": "docs/study/benchmark_costs.csv", **doc.get("cost", {})},
        overrides=list(overrides or []),
        source=str(path),
    )
    for v in suite.variants:
        suite.variant_config(v)  # fail now, with the config's own one-line error, not after an hour
    return suite


def group_by_variant(runs: list[dict], key: str) -> dict[str, list]:
    """``runs[i][key]`` collected per variant, in the order the variants first appear."""
    grouped: dict[str, list] = {}
    for r in runs:
        grouped.setdefault(r["variant"], []).append(r[key])
    return grouped


def write_csv(path: Path, rows: list[dict]) -> None:
    with atomic_file(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))
