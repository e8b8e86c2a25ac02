"""Configuration files and the ``--set`` grammar: the training config, and a model config on its own.

One grammar serves ``train``, ``info`` and ``study``: ``--set key=value`` or ``--set section.key=value``,
the value read as a TOML value (``4``, ``1e-3``, ``true``, ``[256, "full"]``, ``'quoted'``), else taken as
a bare string (``pos_encoding=rope``, ``data.dir=some/folder``). TOML has no null: a global layer in a
per-layer window list is spelled ``"full"``, which :class:`GPTConfig` reads as None.

``seq_len`` (in ``[batch]``) was called ``block_size`` before, the name of the model's context too; the
old spelling is still read, from TOML files, ``--set`` and the configs saved in run and study folders,
with a one-line note on stderr.
"""

from __future__ import annotations

import dataclasses
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gpt2lab.config import FIELDS, PRESETS, GPTConfig
from gpt2lab.errors import GPT2LabError, check_number, check_seed, closest_hint, is_int
from gpt2lab.files import read_json
from gpt2lab.outputs import CONFIG_FILE

# Training-config keys renamed since run folders and TOML files were first written: old -> new.
RENAMED = {"block_size": "seq_len"}
_noted: set[tuple[str, str]] = set()


def _note_old_name(old: str, where: str) -> None:
    """One line on stderr, once per source, when an old key is read."""
    if (where, old) not in _noted:
        _noted.add((where, old))
        print(f"note: {where}: [batch] {old} is now called {RENAMED[old]}; read as {RENAMED[old]}", file=sys.stderr)


def upgrade_train_fields(fields: dict[str, Any], where: str) -> dict[str, Any]:
    """A saved training config (a run's ``train_config``, a study's ``[train]`` table) with its old keys
    renamed, so a folder written before the renaming reads as it did."""
    old = [k for k in RENAMED if k in fields and RENAMED[k] not in fields]
    for key in old:
        _note_old_name(key, where)
    return {RENAMED.get(k, k) if k in old else k: v for k, v in fields.items()}


# ---------------------------------------------------------------------------------------- the grammar


def parse_value(text: str) -> Any:
    """A ``--set`` value is read as TOML (numbers, booleans, lists, quoted strings), else as a bare string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def parse_set(item: str) -> tuple[str | None, str, Any]:
    """``"optim.lr=1e-3"`` -> ``("optim", "lr", 0.001)``; ``"lr=1e-3"`` -> ``(None, "lr", 0.001)``."""
    key, sep, value = item.partition("=")
    section, _, name = key.strip().rpartition(".")
    if not sep or not name:
        raise GPT2LabError(f"--set expects key=value, got {item!r}")
    return section or None, name, parse_value(value.strip())


def read_toml(path: str | Path) -> dict[str, Any]:
    """A TOML file as a dict; a missing, unreadable or invalid file is one error line."""
    path = Path(path)
    if not path.is_file():
        raise GPT2LabError(f"{path} is {'a folder' if path.is_dir() else 'missing'}, not a TOML config file")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise GPT2LabError(f"{path} is not a text file (a TOML config was expected)") from None
    except tomllib.TOMLDecodeError as e:
        raise GPT2LabError(f"{path}: invalid TOML ({e})") from None


# ---------------------------------------------------------------------------------------- model config


def parse_overrides(items: list[str] | None) -> dict[str, Any]:
    """``["n_kv_head=4", "model.window=256"]`` -> ``{"n_kv_head": 4, "window": 256}`` (a model has [model] only)."""
    overrides = {}
    for item in items or []:
        section, key, value = parse_set(item)
        if section not in (None, "model"):
            raise GPT2LabError(f"--set {item!r}: a model config has only [model] keys")
        overrides[key] = value
    return overrides


def load_model_config(source: str, overrides: dict[str, Any] | None = None) -> GPTConfig:
    """A config from a preset name, a JSON or TOML file, or a folder holding ``config.json``.

    A file may hold the GPTConfig fields at top level or under a ``model`` table (the layout of a
    training config), and may name a ``preset`` that its other keys override.
    """
    overrides = overrides or {}
    if source in PRESETS:
        return GPTConfig.from_preset(source, **overrides)
    path = Path(source)
    if path.is_dir():
        path = path / CONFIG_FILE
    if not path.is_file():
        raise GPT2LabError(f"'{source}' is neither a preset ({', '.join(PRESETS)}) nor a config file")
    data = read_toml(path) if path.suffix == ".toml" else read_json(path)
    if isinstance(data.get("model"), dict):
        data = data["model"]
    # A saved model's config.json also names its file format, which is no field of the model.
    data = {k: v for k, v in data.items() if k not in ("format", "format_version")}
    data = {**data, **overrides}
    preset = data.pop("preset", None)
    return GPTConfig.from_preset(preset, **data) if preset else GPTConfig.from_dict(data)


# ---------------------------------------------------------------------------------------- training config


def _opt(section: str, default: Any, key: str | None = None, **kw) -> Any:
    """A field with its TOML section (and key, when it differs from the field name)."""
    return field(default=default, metadata={"section": section, "key": key}, **kw)


@dataclass
class TrainConfig:
    """Everything a run needs. The defaults are the demo: a small character-level model on Tiny Shakespeare.

    In TOML the fields are grouped in sections ``[model] [data] [optim] [batch] [run]``; ``[model]``
    also takes any :class:`GPTConfig` field (``n_layer``, ``pos_encoding``, ``n_kv_head``, ``window``…),
    collected in ``model``. ``seq_len`` in ``[batch]`` is the training sequence length; the model's
    context is ``model.block_size`` (the preset's unless set) and must be at least as long.
    """

    # [model]
    preset: str | None = _opt("model", "tiny")
    init_from: str | None = _opt("model", None)  # pretrained checkpoint: fine-tune instead of init
    convert_n_kv_head: int | None = _opt("model", None)  # GQA uptraining: pool K/V heads of init_from
    convert_kv_init: str = _opt("model", "mean")  # mean: each group's K/V heads averaged; first: its first head
    vocab_multiple: int = _opt("model", 64)  # vocabulary rows padded to a multiple of this (1: none); see model.GPT
    model: dict = field(
        default_factory=lambda: {"n_layer": 4, "n_embd": 128, "block_size": 128, "pos_encoding": "rope", "window": 128},
        metadata={"section": "model"},
    )
    # [data]
    data_dir: str = _opt("data", "data/shakespeare-char", key="dir")
    # [optim]
    lr: float = _opt("optim", 1e-3)
    min_lr: float = _opt("optim", 1e-4)
    warmup_iters: int = _opt("optim", 50)
    max_iters: int = _opt("optim", 1000)
    lr_decay_iters: int | None = _opt("optim", None)  # None: max_iters
    weight_decay: float = _opt("optim", 0.1)
    betas: list = field(default_factory=lambda: [0.9, 0.99], metadata={"section": "optim", "key": None})
    grad_clip: float = _opt("optim", 1.0)  # 0 disables
    skip_nonfinite: bool = _opt("optim", False)  # skip a step with a non-finite loss or gradient instead of stopping
    # [batch]
    batch_size: int = _opt("batch", 8)  # sequences per micro-batch per process
    seq_len: int = _opt("batch", 128)  # tokens per training sequence (was block_size)
    grad_accum: int = _opt("batch", 1)  # micro-batches per step, in total over all processes
    # [run]
    out_dir: str = _opt("run", "runs/demo")
    eval_interval: int = _opt("run", 250)
    eval_iters: int = _opt("run", 10)
    ckpt_interval: int = _opt("run", 250)
    log_interval: int = _opt("run", 1)
    seed: int = _opt("run", 1337)
    dtype: str = _opt("run", "auto")  # auto | float32 | bfloat16 | float16 (autocast; fp16 with loss scaling)
    compile: bool = _opt("run", False)
    device: str = _opt("run", "auto")
    strategy: str = _opt("run", "ddp")  # ddp | fsdp, used in a process group
    # auto: a process group under torchrun only; always: a group of one in a single process too, which
    # runs the DDP / FSDP2 paths on one device (gpt2lab.train.distributed)
    process_group: str = _opt("run", "auto")
    hellaswag_interval: int = _opt("run", 0)  # score HellaSwag every N steps (and at the end); 0: never
    hellaswag_file: str = _opt("run", "val")  # a HellaSwag jsonl, or "val": the official file, downloaded
    log_to: list = field(default_factory=list, metadata={"section": "run", "key": None})  # gpt2lab.train.tracking
    # [reference]: published validation losses printed beside the run's own (name, source, points)
    reference: dict = field(default_factory=dict, metadata={"section": "reference"})

    def validate(self) -> None:
        """Every value's type and range, with one line naming the first wrong one."""
        for name, allowed in _CHOICES.items():
            if getattr(self, name) not in allowed:
                raise GPT2LabError(f"config: {name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        for name, low in _INTEGERS.items():
            value = getattr(self, name)
            if not is_int(value) or value < low:
                kind = "a positive integer" if low == 1 else f"an integer >= {low}"
                raise GPT2LabError(f"config: {name} must be {kind}, got {value!r}")
        check_seed("config: seed", self.seed)
        decay = self.lr_decay_iters
        if decay is not None and (not is_int(decay) or decay < 1):
            raise GPT2LabError(f"config: lr_decay_iters must be a positive integer or unset, got {decay!r}")
        for name, (low, open_low) in _NUMBERS.items():
            check_number(f"config: {name}", getattr(self, name), low=low, low_open=open_low)
        if not isinstance(self.betas, list) or len(self.betas) != 2:
            raise GPT2LabError(f"config: betas must be a list of two numbers in [0, 1), got {self.betas!r}")
        for beta in self.betas:
            check_number("config: each of betas", beta, low=0.0, high=1.0)
        for name in ("data_dir", "out_dir", "device", "preset", "init_from", "hellaswag_file"):
            value = getattr(self, name)
            if not (isinstance(value, str) and value) and not (value is None and name in ("preset", "init_from")):
                raise GPT2LabError(f"config: {name} must be a non-empty string, got {value!r}")
        for name in ("compile", "skip_nonfinite"):
            if not isinstance(getattr(self, name), bool):
                raise GPT2LabError(f"config: {name} must be true or false, got {getattr(self, name)!r}")
        self._validate_model()
        self._validate_reference()

    def _validate_reference(self) -> None:
        """``[reference]``: a ``name``, a ``source`` and ``points`` = [[tokens seen, val loss], ...] by tokens."""
        ref = self.reference
        if not ref:
            return
        if not isinstance(ref, dict) or not all(isinstance(ref.get(k), str) and ref[k] for k in ("name", "source")):
            raise GPT2LabError("config: [reference] needs a name and a source (where its numbers come from)")
        points = ref.get("points")
        ok = isinstance(points, list) and points and all(isinstance(p, list) and len(p) == 2 for p in points)
        if ok:
            for tokens, loss in points:
                check_number("config: reference tokens", tokens, low=0.0, low_open=True)
                check_number("config: reference val loss", loss, low=0.0, low_open=True)
        if not ok or [p[0] for p in points] != sorted(p[0] for p in points):
            raise GPT2LabError("config: [reference] points must be [[tokens seen, val loss], ...] in order of tokens")

    def reference_at(self, tokens: int) -> tuple[float, float] | None:
        """The first reference point at or past ``tokens`` seen (else the last): (tokens, val loss)."""
        points = self.reference.get("points") if self.reference else None
        if not points:
            return None
        return next((tuple(p) for p in points if p[0] >= tokens), tuple(points[-1]))

    def _validate_model(self) -> None:
        if not isinstance(self.model, dict):
            raise GPT2LabError("config: [model] must be a table of model fields")
        if self.preset is None and self.init_from is None and not self.model:
            raise GPT2LabError("config: [model] needs a preset, init_from or the model's fields")
        if self.init_from is not None and self.model:
            raise GPT2LabError(
                f"config: with init_from the model's shape comes from the checkpoint; remove {', '.join(self.model)}"
            )
        if self.convert_n_kv_head is not None and self.init_from is None:
            raise GPT2LabError("config: convert_n_kv_head converts a pretrained model; set init_from too")
        if self.init_from is None:  # the model's fields are checked now, not after the data is read
            fields = {k: v for k, v in self.model.items() if k not in ("vocab_size", "padded_vocab_size")}
            GPTConfig.from_preset(self.preset, **fields) if self.preset else GPTConfig.from_dict(fields)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


_CHOICES = {
    "dtype": ("auto", "float32", "bfloat16", "float16"),
    "strategy": ("ddp", "fsdp"),
    "process_group": ("auto", "always"),
    "convert_kv_init": ("mean", "first"),
}
_INTEGERS = {  # field: smallest value
    **dict.fromkeys(("max_iters", "batch_size", "seq_len", "grad_accum", "eval_iters", "vocab_multiple"), 1),
    **dict.fromkeys(("eval_interval", "ckpt_interval", "log_interval"), 1),
    **dict.fromkeys(("warmup_iters", "seed", "hellaswag_interval"), 0),
}
_NUMBERS = {"lr": (0.0, True), "min_lr": (0.0, False), "weight_decay": (0.0, False), "grad_clip": (0.0, False)}

TRAIN_FIELDS = tuple(f.name for f in dataclasses.fields(TrainConfig))


def _keys() -> dict[str, dict[str, str]]:
    """section → {TOML key: field name}."""
    sections: dict[str, dict[str, str]] = {}
    for f in dataclasses.fields(TrainConfig):
        if f.name not in ("model", "reference"):
            sections.setdefault(f.metadata["section"], {})[f.metadata["key"] or f.name] = f.name
    return sections


def _set(cfg: TrainConfig, section: str | None, key: str, value: Any, where: str = "--set") -> None:
    if section == "reference" or (section is None and key == "reference"):  # a table of its own
        cfg.reference = value if section is None else {**cfg.reference, key: value}
        return
    sections = _keys()
    if key in RENAMED and section in (None, "batch"):  # a bare block_size was the batch's before, as now
        _note_old_name(key, where)
        key = RENAMED[key]
    if section is not None and section not in sections:
        raise GPT2LabError(f"config: unknown section [{section}]{closest_hint(section, sections)}")
    candidates = [section] if section else list(sections)
    for sec in candidates:
        if key in sections[sec]:
            setattr(cfg, sections[sec][key], value)
            return
    if "model" in candidates and key in FIELDS:
        cfg.model[key] = value
        return
    home = [sec for sec in sections if key in sections[sec] or (sec == "model" and key in FIELDS)]
    if home:
        raise GPT2LabError(f"config: '{key}' belongs in [{home[0]}], not [{section}]")
    known = [k for keys in sections.values() for k in keys] + list(FIELDS)
    where = f" in [{section}]" if section else ""
    raise GPT2LabError(f"config: unknown key '{key}'{where}{closest_hint(key, known)}")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """The defaults, updated by a TOML file, then by ``key=value`` / ``section.key=value`` overrides."""
    cfg = TrainConfig()
    if path is not None:
        doc = read_toml(path)
        if "model" in doc:  # a file's [model] replaces the default shape rather than merging into it
            cfg.model = {}
        for section, table in doc.items():
            if not isinstance(table, dict):
                raise GPT2LabError(f"{path}: '{section}' must be a [section]; keys go inside one")
            for key, value in table.items():
                _set(cfg, section, key, value, where=str(path))
    for item in overrides or []:
        _set(cfg, *parse_set(item))
    cfg.validate()
    return cfg
