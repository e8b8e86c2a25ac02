"""Reading and writing GPT-2 checkpoints in the four formats people actually have.

* **Hugging Face hub ids** (``gpt2``, ``openai-community/gpt2-medium``, any ``org/name``): downloaded
  through ``huggingface_hub``'s cache, then read as a hub-layout folder. Offline, the loader asks the
  hub once with a short timeout and no retries, falls back to the cache, and otherwise fails at once.
* **Hub-layout folders** (``config.json`` + ``model.safetensors``, sharded safetensors or
  ``pytorch_model.bin``): what ``transformers`` writes. GPT-2's ``Conv1D`` stores weights as
  (in, out), so those are transposed; ``.bin`` files are unpickled with ``weights_only=True``.
* **OpenAI's TensorFlow checkpoints** (``hparams.json``, ``model.ckpt.index``, ``model.ckpt.data-*``),
  read without TensorFlow: the index is a LevelDB-style table of protobuf records, decoded here by a
  few dozen lines, and every tensor is checked against its CRC32C.
* **gpt2lab's own format** (:func:`save_pretrained`): ``model.safetensors`` + ``config.json`` holding
  :class:`GPTConfig` with ``"format": "gpt2lab"``, so every variant (RoPE, GQA, windows) round-trips.

Every reader returns a state dict in gpt2lab's names after checking it against the config: all
missing, unexpected and mis-shaped tensors are reported together in one line, never as a torch
traceback. :func:`export_hf` writes the hub layout for ``transformers.GPT2LMHeadModel``.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import struct
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import crc32c
import numpy as np
import torch

from .config import GPT2LabError, GPTConfig, closest_hint
from .model import GPT

__all__ = [
    "TFCheckpointReader",
    "TFTensorEntry",
    "export_hf",
    "gpt_config_to_hf",
    "gpt_state_shapes",
    "hf_config_to_gpt",
    "load_pretrained",
    "save_pretrained",
]

GPT2LAB_FORMAT = "gpt2lab"
GPT2LAB_FORMAT_VERSION = 1

# Seconds to wait for the hub's first answer. huggingface_hub's own default (10 s, then up to five
# retries with back-off, about 25 s in all) is what makes an offline ``from_pretrained("gpt2")`` hang.
HUB_TIMEOUT_S = 5.0

# Names the hub still resolves without an organisation (they redirect to openai-community/ and
# distilbert/). Any other bare name is a typo, not a download to attempt.
LEGACY_HUB_NAMES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl", "distilgpt2")

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
_HF_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
_OFFLINE_ADVICE = "pass a local folder with config.json + model.safetensors, or an OpenAI TF checkpoint folder"


# ======================================================================================== public API


def load_pretrained(
    name_or_path: str | os.PathLike,
    *,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
) -> GPT:
    """A :class:`GPT` with the weights of a hub id, a hub-layout folder or file, an OpenAI TF checkpoint
    (folder or ``model.ckpt`` prefix) or a gpt2lab folder.

    Parameters come back as float32 unless ``dtype`` is given (a ``torch.dtype`` or a name such as
    ``"bfloat16"``), then are moved to ``device``. Dropout is 0: checkpoints carry weights, not the
    regularisation of the run that produced them. Every failure is a one-line :class:`GPT2LabError`.
    """
    dtype = _resolve_dtype(dtype)
    source = _locate(str(name_or_path))
    config, state = _READERS[source.kind](source)
    model = _build_model(config, state)
    return model.to(device=device, dtype=dtype) if dtype is not None or device is not None else model


def save_pretrained(model: GPT, directory: str | os.PathLike) -> None:
    """Write ``model.safetensors`` and ``config.json`` (gpt2lab format) into ``directory``.

    The tied LM head is stored once, as ``transformer.wte.weight``. Each file is written to a temporary
    name and moved into place, so a crash or a full disk never leaves a half-written checkpoint; the
    config goes last, so a folder whose config.json is readable has its weights.
    """
    model = _unwrap(model)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = _state_to_save(model)
    _write_safetensors(directory / "model.safetensors", state)
    config = {"format": GPT2LAB_FORMAT, "format_version": GPT2LAB_FORMAT_VERSION, **model.config.to_dict()}
    _write_json(directory / "config.json", config)


def export_hf(model: GPT, directory: str | os.PathLike) -> None:
    """Write the Hugging Face hub layout (``config.json`` + ``model.safetensors``) that
    ``transformers.GPT2LMHeadModel.from_pretrained`` loads without missing or unexpected keys.

    Only the plain GPT-2 architecture exists in ``transformers``' GPT-2: learned positions, as many
    key/value heads as query heads, full attention. Anything else is refused rather than exported as
    a model that would silently compute something different.
    """
    model = _unwrap(model)
    c = model.config
    unsupported = []
    if c.pos_encoding != "learned":
        unsupported.append(f"{c.pos_encoding} positions")
    if c.n_kv_head != c.n_head:
        unsupported.append(f"{c.n_kv_head} key/value heads for {c.n_head} query heads")
    if any(c.layer_window(i) is not None for i in range(c.n_layer)):
        unsupported.append(f"sliding-window attention (window={c.window})")
    if unsupported:
        raise GPT2LabError(
            "export_hf: only plain GPT-2 (learned positions, multi-head, full attention) exists in transformers; "
            f"this model has {', '.join(unsupported)}; use save_pretrained for gpt2lab's own format"
        )
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    # gpt2lab's names are GPT2LMHeadModel's; transformers, too, saves the tied lm_head only as wte.
    state = {name: _HF.from_gpt(name, t).contiguous() for name, t in _state_to_save(model).items()}
    _write_safetensors(directory / "model.safetensors", state)
    _write_json(directory / "config.json", gpt_config_to_hf(c, dtype=model.lm_head.weight.dtype))


# ======================================================================================== locating a checkpoint


@dataclass(frozen=True)
class _Source:
    """A checkpoint found on disk: which reader, its config file, and its weight files.

    ``kind`` is ``"gpt2lab"``, ``"hf"`` or ``"tf"``; for ``"tf"`` ``weights`` holds the checkpoint prefix
    (``.../model.ckpt``).
    """

    kind: str
    config: Path
    weights: tuple[Path, ...]


def _locate(name: str) -> _Source:
    """Decide what ``name`` is: an existing path, a TF prefix, a hub id, or nothing we know."""
    path = Path(name).expanduser()
    if path.exists():
        return _local_source(path)
    if Path(f"{path}.index").is_file():  # a TF prefix such as .../model.ckpt
        return _tf_source(path)
    looks_like_path = name.startswith((".", "/", "~")) or path.suffix in (".safetensors", ".bin", ".json", ".index")
    if looks_like_path or not _HUB_ID.match(name):
        raise GPT2LabError(f"unknown model '{name}': no such file or folder, and not a Hugging Face hub id (org/name)")
    if "/" not in name and name not in LEGACY_HUB_NAMES:
        raise GPT2LabError(
            f"unknown model '{name}'{closest_hint(name, LEGACY_HUB_NAMES)}: no such file or folder; hub ids are "
            f"'org/name' (or one of {', '.join(LEGACY_HUB_NAMES)})"
        )
    return _hub_source(name)


def _local_source(path: Path) -> _Source:
    """Classify an existing file or folder by the files it holds."""
    if path.is_file():
        if path.name == "config.json":
            return _local_source(path.parent)
        if path.suffix == ".index":
            return _tf_source(path.with_suffix(""))
        if path.suffix in (".safetensors", ".bin"):
            return _source_from_config(path.parent / "config.json", (path,))
        raise GPT2LabError(f"{path}: not a checkpoint file (expected .safetensors, .bin or a TF .index)")
    folder = path
    if (folder / "config.json").is_file():
        for weights in _HF_WEIGHT_FILES:
            if (folder / weights).is_file():
                return _source_from_config(folder / "config.json", _expand_shards(folder / weights))
        raise GPT2LabError(f"{folder} has config.json but no {', '.join(_HF_WEIGHT_FILES)}")
    if (folder / "hparams.json").is_file() or any(folder.glob("*.index")):
        return _tf_source(folder)
    raise GPT2LabError(
        f"no checkpoint in {folder}: expected config.json + model.safetensors or pytorch_model.bin, "
        "or an OpenAI TF checkpoint (hparams.json + model.ckpt.index/.data-*)"
    )


def _source_from_config(config: Path, weights: tuple[Path, ...]) -> _Source:
    """gpt2lab and transformers both call their config ``config.json``; gpt2lab's carries a marker."""
    if not config.is_file():
        raise GPT2LabError(f"{weights[0]} has no config.json next to it (needed for the model's shape)")
    kind = "gpt2lab" if _read_json(config).get("format") == GPT2LAB_FORMAT else "hf"
    return _Source(kind, config, weights)


def _expand_shards(weights: Path) -> tuple[Path, ...]:
    """The files behind a weights path: a sharded index names its shards, anything else is itself."""
    if not weights.name.endswith(".index.json"):
        return (weights,)
    weight_map = _read_json(weights).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise GPT2LabError(f"{weights}: no weight_map in the shard index")
    return tuple(weights.parent / shard for shard in dict.fromkeys(weight_map.values()))


def _tf_source(path: Path) -> _Source:
    prefix = _tf_prefix(path)
    return _Source("tf", prefix.parent / "hparams.json", (prefix,))


# ======================================================================================== the hub


def _hub_source(repo_id: str) -> _Source:
    """Download (or find in the cache) config.json and the weights of ``repo_id``."""
    offline_reason = _hub_unreachable(repo_id)
    config = _hub_file(repo_id, "config.json", offline_reason)
    if config is None:
        if offline_reason:
            raise _offline_error(repo_id, offline_reason)
        raise GPT2LabError(f"hub repo '{repo_id}' has no config.json: it is not a transformers model")
    for filename in _HF_WEIGHT_FILES:
        weights = _hub_file(repo_id, filename, offline_reason)
        if weights is None:
            continue
        if filename.endswith(".index.json"):
            shards = [_hub_file(repo_id, p.name, offline_reason) for p in _expand_shards(weights)]
            if any(s is None for s in shards):
                raise _offline_error(repo_id, offline_reason or "a shard is missing")
            return _source_from_config(config, tuple(shards))
        return _source_from_config(config, (weights,))
    if offline_reason:
        raise _offline_error(repo_id, offline_reason)
    raise GPT2LabError(f"hub repo '{repo_id}' has none of {', '.join(_HF_WEIGHT_FILES)}")


def _hub_unreachable(repo_id: str) -> str | None:
    """Why the hub cannot be used right now (then only the cache is), or None when it answers.

    One HEAD request with a short timeout and no retries: a machine without network learns that in
    milliseconds (or ``HUB_TIMEOUT_S`` at worst) instead of after huggingface_hub's retry back-off.
    """
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url
    from huggingface_hub.errors import RemoteEntryNotFoundError, RepositoryNotFoundError

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    try:
        get_hf_file_metadata(hf_hub_url(repo_id, "config.json"), timeout=HUB_TIMEOUT_S)
    except RepositoryNotFoundError as err:
        raise GPT2LabError(
            f"no model '{repo_id}' on the Hugging Face hub (or it is private or gated: log in with `hf auth login`)"
        ) from err
    except RemoteEntryNotFoundError:
        return None  # the repo exists; _hub_source reports the missing config.json
    except Exception as err:  # any failure to get an answer means: work from the cache
        return _one_line(f"{type(err).__name__}: {err}")
    return None


def _hub_file(repo_id: str, filename: str, offline_reason: str | None) -> Path | None:
    """The local path of one file of ``repo_id`` (downloaded if the hub is reachable), or None when
    the repo does not have it (online) or the cache does not (offline)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import LocalEntryNotFoundError, RemoteEntryNotFoundError

    offline = offline_reason is not None
    try:
        return Path(hf_hub_download(repo_id, filename, etag_timeout=HUB_TIMEOUT_S, local_files_only=offline))
    except RemoteEntryNotFoundError:  # the hub answered: the repo has no such file
        return None
    except LocalEntryNotFoundError as err:  # not in the cache, and the hub could not be asked
        if offline:
            return None
        raise _offline_error(repo_id, "the connection failed during the download") from err
    except Exception as err:  # HTTP statuses, dropped connections, a full disk: one line, cause chained
        raise GPT2LabError(
            f"could not download {filename} of '{repo_id}': {_one_line(f'{type(err).__name__}: {err}')}"
        ) from err


def _offline_error(repo_id: str, reason: str) -> GPT2LabError:
    return GPT2LabError(
        f"could not download '{repo_id}' from the Hugging Face hub (offline? {reason}); {_OFFLINE_ADVICE}"
    )


def _one_line(text: str, limit: int = 160) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


# ======================================================================================== names and shapes


def gpt_state_shapes(config: GPTConfig) -> dict[str, tuple[int, ...]]:
    """Name → shape of every tensor a :class:`GPT` of ``config`` loads, without the tied ``lm_head``.

    Computed from the config (not by building a model) so a checkpoint is checked before any memory
    is spent on it; a test holds this equal to ``GPT(config).state_dict()`` for every variant.
    """
    C, kv = config.n_embd, config.n_kv_head * config.head_dim
    shapes = {"transformer.wte.weight": (config.vocab_size, C)}
    if config.pos_encoding == "learned":
        shapes["transformer.wpe.weight"] = (config.block_size, C)
    for i in range(config.n_layer):
        h = f"transformer.h.{i}"
        shapes |= {
            f"{h}.ln_1.weight": (C,),
            f"{h}.ln_1.bias": (C,),
            f"{h}.attn.c_attn.weight": (C + 2 * kv, C),  # rows: q | k | v
            f"{h}.attn.c_attn.bias": (C + 2 * kv,),
            f"{h}.attn.c_proj.weight": (C, C),
            f"{h}.attn.c_proj.bias": (C,),
            f"{h}.ln_2.weight": (C,),
            f"{h}.ln_2.bias": (C,),
            f"{h}.mlp.c_fc.weight": (4 * C, C),
            f"{h}.mlp.c_fc.bias": (4 * C,),
            f"{h}.mlp.c_proj.weight": (C, 4 * C),
            f"{h}.mlp.c_proj.bias": (C,),
        }
    shapes |= {"transformer.ln_f.weight": (C,), "transformer.ln_f.bias": (C,)}
    return shapes


def _is_projection_weight(name: str) -> bool:
    """GPT-2's Conv1D layers: stored (in, out) by OpenAI and transformers, (out, in) by nn.Linear."""
    return name.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight"))


class _Layout:
    """How one format names and lays out each gpt2lab tensor. The identity: gpt2lab's own format."""

    def name(self, gpt_name: str) -> str:
        return gpt_name

    def shape(self, gpt_name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
        return shape

    def to_gpt(self, gpt_name: str, tensor: torch.Tensor) -> torch.Tensor:
        return tensor


class _HFLayout(_Layout):
    """transformers' GPT2Model names (``h.0.attn.c_attn.weight``) with Conv1D weights as (in, out)."""

    def name(self, gpt_name: str) -> str:
        return gpt_name.removeprefix("transformer.")

    def shape(self, gpt_name, shape):
        return shape[::-1] if _is_projection_weight(gpt_name) else shape

    def to_gpt(self, gpt_name, tensor):
        return tensor.t() if _is_projection_weight(gpt_name) else tensor

    def from_gpt(self, gpt_name: str, tensor: torch.Tensor) -> torch.Tensor:
        return self.to_gpt(gpt_name, tensor)  # a transpose is its own inverse


class _TFLayout(_Layout):
    """OpenAI's names (``model/h0/attn/c_attn/w``): LayerNorm g/b, Conv1D w as [1, in, out], b."""

    def name(self, gpt_name):
        parts = gpt_name.removeprefix("transformer.").split(".")
        if parts[0] in ("wte", "wpe"):
            return f"model/{parts[0]}"
        if parts[0] == "h":
            parts = [f"h{parts[1]}", *parts[2:]]
        module, leaf = parts[-2], parts[-1]
        parts[-1] = "b" if leaf == "bias" else "g" if module.startswith("ln_") else "w"
        return "model/" + "/".join(parts)

    def shape(self, gpt_name, shape):
        return (1, *shape[::-1]) if _is_projection_weight(gpt_name) else shape

    def to_gpt(self, gpt_name, tensor):
        return tensor[0].t() if _is_projection_weight(gpt_name) else tensor


_GPT2LAB, _HF, _TF = _Layout(), _HFLayout(), _TFLayout()


def _collect_state(
    config: GPTConfig,
    found: Mapping[str, tuple[int, ...]],
    load: Callable[[str], torch.Tensor],
    layout: _Layout,
    what: str,
) -> dict[str, torch.Tensor]:
    """gpt2lab's state dict from a checkpoint whose tensors (name → shape in ``found``) follow ``layout``.

    Names and shapes are checked before anything is loaded, so a wrong checkpoint costs no reading.
    """
    wanted = {gpt: (layout.name(gpt), layout.shape(gpt, shape)) for gpt, shape in gpt_state_shapes(config).items()}
    _check_tensors(found, dict(wanted.values()), what)
    return {gpt: layout.to_gpt(gpt, load(name)) for gpt, (name, _) in wanted.items()}


def _check_tensors(found: Mapping[str, tuple[int, ...]], expected: Mapping[str, tuple[int, ...]], what: str) -> None:
    """One error naming every missing, unexpected and mis-shaped tensor (grouped over layers)."""
    missing = [n for n in expected if n not in found]
    unexpected = sorted((n for n in found if n not in expected), key=_natural_key)
    misshaped = [(n, tuple(found[n]), expected[n]) for n in expected if n in found and tuple(found[n]) != expected[n]]
    if not (missing or unexpected or misshaped):
        return
    problems = []
    if missing:
        problems.append(f"missing {_compact(missing)}")
    if unexpected:
        problems.append(f"unexpected {_compact(unexpected)}")
    by_shapes: dict[tuple, list[str]] = {}
    for name, got, want in misshaped:
        by_shapes.setdefault((got, want), []).append(name)
    for (got, want), names in by_shapes.items():
        problems.append(f"shape of {_compact(names)} is {got}, expected {want}")
    raise GPT2LabError(f"{what} does not match the config: {'; '.join(problems)}")


_LAYER_NUMBER = re.compile(r"^(.*?h[./]?)(\d+)([./].*)$")


def _natural_key(name: str) -> tuple:
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name))


def _compact(names: list[str]) -> str:
    """``h.[0-2,5].ln_1.weight, wte.weight``: names that differ only by layer number share one entry."""
    groups: dict[tuple[str, str], list[int]] = {}
    for name in names:
        m = _LAYER_NUMBER.match(name)
        key = (m.group(1), m.group(3)) if m else (name, "")
        groups.setdefault(key, []).append(int(m.group(2)) if m else -1)
    parts = []
    for (head, tail), layers in groups.items():
        if layers == [-1]:
            parts.append(head)
        elif len(layers) == 1:
            parts.append(f"{head}{layers[0]}{tail}")
        else:
            parts.append(f"{head}[{_ranges(sorted(layers))}]{tail}")
    return ", ".join(parts)


def _ranges(numbers: list[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> '0-2,5,7-8'."""
    runs: list[list[int]] = []
    for n in numbers:
        if runs and n == runs[-1][1] + 1:
            runs[-1][1] = n
        else:
            runs.append([n, n])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def _build_model(config: GPTConfig, state: dict[str, torch.Tensor]) -> GPT:
    """A float32 GPT holding ``state`` (names already checked, so load_state_dict cannot complain)."""
    model = GPT(config)
    with torch.no_grad():
        model.load_state_dict({**state, "lm_head.weight": state["transformer.wte.weight"]}, strict=True)
    return model


_DTYPE_NAMES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "float64": torch.float64,
}


def _resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).removeprefix("torch.")
    if key not in _DTYPE_NAMES:
        raise GPT2LabError(f"unknown dtype '{dtype}'{closest_hint(key, _DTYPE_NAMES)}")
    return _DTYPE_NAMES[key]


# ======================================================================================== gpt2lab's own format


def _read_gpt2lab(source: _Source) -> tuple[GPTConfig, dict[str, torch.Tensor]]:
    raw = _read_json(source.config)
    fields = {k: v for k, v in raw.items() if k not in ("format", "format_version")}
    version = raw.get("format_version", GPT2LAB_FORMAT_VERSION)
    if not isinstance(version, int) or version > GPT2LAB_FORMAT_VERSION:
        raise GPT2LabError(f"{source.config}: format_version {version!r} is not one this gpt2lab reads")
    config = GPTConfig.from_dict(fields)
    tensors = _read_weight_files(source.weights)
    tensors.pop("lm_head.weight", None)  # tied: wte is the one copy that counts
    found = {name: tuple(t.shape) for name, t in tensors.items()}
    return config, _collect_state(config, found, tensors.__getitem__, _GPT2LAB, str(source.weights[0]))


def _unwrap(model: GPT) -> GPT:
    """The model inside torch.compile's wrapper, whose state dict prefixes every name with _orig_mod."""
    return getattr(model, "_orig_mod", model)


def _state_to_save(model: GPT) -> dict[str, torch.Tensor]:
    """The model's tensors on the CPU, contiguous, with the tied LM head left out (it is wte)."""
    if model.lm_head.weight is not model.transformer.wte.weight:
        raise GPT2LabError("lm_head is no longer tied to transformer.wte: GPT-2 checkpoints store one shared matrix")
    state = model.state_dict()
    state.pop("lm_head.weight")
    return {name: t.detach().to("cpu").contiguous() for name, t in state.items()}


# ======================================================================================== Hugging Face layout


# transformers' GPT2Config defaults: a config.json that omits a field means this value to transformers.
_HF_DEFAULTS = dict(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12, layer_norm_epsilon=1e-5)


def hf_config_to_gpt(hf: Mapping[str, Any], where: str = "config.json") -> GPTConfig:
    """The :class:`GPTConfig` of a transformers GPT2Config dict, refusing what gpt2lab cannot compute.

    ``reorder_and_upcast_attn`` is accepted: it only changes the precision of the attention scores in
    half precision. Dropout rates are training settings of the source run and are not carried over.
    """
    model_type = hf.get("model_type", "gpt2")
    if model_type != "gpt2":
        raise GPT2LabError(f"{where} describes a '{model_type}' model; gpt2lab reads GPT-2 checkpoints only")
    d = {**_HF_DEFAULTS, **{k: v for k, v in hf.items() if v is not None}}
    if "n_positions" not in hf and "n_ctx" in hf:  # configs from before n_positions existed
        d["n_positions"] = hf["n_ctx"]
    refused = []
    activation = d.get("activation_function", "gelu_new")
    if activation not in ("gelu_new", "gelu_pytorch_tanh"):
        refused.append(f"activation_function '{activation}' (gpt2lab uses the tanh GELU, 'gelu_new')")
    if d.get("n_inner") not in (None, 4 * d["n_embd"]):
        refused.append(f"n_inner {d['n_inner']} (gpt2lab's MLP is 4 x n_embd = {4 * d['n_embd']})")
    if not d.get("scale_attn_weights", True):
        refused.append("scale_attn_weights false (gpt2lab always divides scores by sqrt(head size))")
    if d.get("scale_attn_by_inverse_layer_idx", False):
        refused.append("scale_attn_by_inverse_layer_idx")
    if d.get("add_cross_attention", False):
        refused.append("add_cross_attention")
    if not d.get("tie_word_embeddings", True):
        refused.append("tie_word_embeddings false (gpt2lab ties lm_head to wte)")
    if refused:
        raise GPT2LabError(f"{where}: gpt2lab cannot represent {'; '.join(refused)}")
    return GPTConfig(
        block_size=d["n_positions"],
        vocab_size=d["vocab_size"],
        n_layer=d["n_layer"],
        n_head=d["n_head"],
        n_embd=d["n_embd"],
        layer_norm_epsilon=float(d["layer_norm_epsilon"]),
    )


def gpt_config_to_hf(config: GPTConfig, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """transformers' GPT2Config fields for a plain GPT-2 ``config`` (as ``save_pretrained`` writes them)."""
    eot = 50256
    special = eot if config.vocab_size > eot else None  # an id outside the vocabulary would break generate()
    return {
        "activation_function": "gelu_new",
        "add_cross_attention": False,
        "architectures": ["GPT2LMHeadModel"],
        "attn_pdrop": config.dropout,
        "bos_token_id": special,
        "dtype": str(dtype).removeprefix("torch."),
        "embd_pdrop": config.dropout,
        "eos_token_id": special,
        "initializer_range": 0.02,
        "layer_norm_epsilon": config.layer_norm_epsilon,
        "model_type": "gpt2",
        "n_ctx": config.block_size,
        "n_embd": config.n_embd,
        "n_head": config.n_head,
        "n_inner": None,
        "n_layer": config.n_layer,
        "n_positions": config.block_size,
        "reorder_and_upcast_attn": False,
        "resid_pdrop": config.dropout,
        "scale_attn_by_inverse_layer_idx": False,
        "scale_attn_weights": True,
        "summary_activation": None,
        "summary_first_dropout": 0.1,
        "summary_proj_to_labels": True,
        "summary_type": "cls_index",
        "summary_use_proj": True,
        "tie_word_embeddings": True,
        "use_cache": True,
        "vocab_size": config.vocab_size,
    }


# Buffers older transformers saved with GPT-2 (the causal mask and its fill value): not weights.
_HF_BUFFER = re.compile(r"^h\.\d+\.attn\.(bias|masked_bias)$")


def _read_hf(source: _Source) -> tuple[GPTConfig, dict[str, torch.Tensor]]:
    config = hf_config_to_gpt(_read_json(source.config), str(source.config))
    tensors = {}
    for name, tensor in _read_weight_files(source.weights).items():
        short = name.removeprefix("transformer.")  # GPT2LMHeadModel has the prefix, GPT2Model does not
        if not _HF_BUFFER.match(short):
            tensors[short] = tensor
    _drop_tied_head(tensors, source.weights[0])
    found = {name: tuple(t.shape) for name, t in tensors.items()}
    return config, _collect_state(config, found, tensors.__getitem__, _HF, str(source.weights[0]))


def _drop_tied_head(tensors: dict[str, torch.Tensor], where: Path) -> None:
    """Remove ``lm_head.weight`` when it is the tied copy of wte; refuse a head that differs."""
    head, wte = tensors.pop("lm_head.weight", None), tensors.get("wte.weight")
    if head is not None and wte is not None and (head.shape != wte.shape or not torch.equal(head, wte)):
        raise GPT2LabError(f"{where}: lm_head.weight differs from wte.weight; gpt2lab needs the tied GPT-2 head")


def _read_weight_files(paths: tuple[Path, ...]) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for path in paths:
        tensors |= _read_safetensors(path) if path.suffix == ".safetensors" else _read_torch_bin(path)
    return tensors


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise GPT2LabError(f"missing weights file {path}")
    try:
        return load_file(path)
    except SafetensorError as err:
        raise GPT2LabError(f"{path} is not a readable safetensors file: {_one_line(str(err))}") from err


def _read_torch_bin(path: Path) -> dict[str, torch.Tensor]:
    """A ``pytorch_model.bin`` state dict, unpickled with ``weights_only=True``.

    A pickle can run arbitrary code when loaded; the weights-only unpickler allows tensors and plain
    containers only, so a file carrying anything else is refused before any of it runs.
    """
    if not path.is_file():
        raise GPT2LabError(f"missing weights file {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise GPT2LabError(
            f"refusing to load {path}: it holds objects other than tensors (a pickle can run code); "
            "use a model.safetensors from a source you trust"
        ) from err
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise GPT2LabError(f"{path} is not a readable PyTorch checkpoint: {_one_line(str(err))}") from err
    if not isinstance(state, Mapping) or not all(isinstance(t, torch.Tensor) for t in state.values()):
        raise GPT2LabError(f"{path} does not hold a state dict (a mapping of names to tensors)")
    return dict(state)


# ======================================================================================== OpenAI TF checkpoints
#
# A TF checkpoint ("tensor bundle") is an index file plus data shards. The index is a LevelDB table:
#   data blocks | metaindex block | index block | footer (48 bytes)
# The footer holds two block handles (varint offset, varint size), zero padding to 40 bytes, and the
# magic number. A block is a run of prefix-compressed key/value entries, then restart offsets (uint32
# each) and their count; every block is followed by a 1-byte compression type and a masked CRC32C of
# block + type. Keys are tensor names in byte order; the empty key holds the BundleHeaderProto and
# every other value is a BundleEntryProto telling where a tensor's raw bytes are in the data shard.

_TABLE_MAGIC = 0xDB4775248B80FB57
_FOOTER_SIZE = 48
_BLOCK_TRAILER_SIZE = 5

# tensorflow/core/framework/types.proto: DataType enum values and their little-endian numpy types.
_TF_DTYPES = {
    1: "float32",
    2: "float64",
    3: "int32",
    4: "uint8",
    5: "int16",
    6: "int8",
    7: "string",
    9: "int64",
    10: "bool",
    14: "bfloat16",
    17: "uint16",
    19: "float16",
    22: "uint32",
    23: "uint64",
}


def masked_crc32c(data: bytes) -> int:
    """CRC32C as TensorFlow and LevelDB store it: rotated and offset, so that a CRC of bytes that
    themselves contain CRCs does not degenerate."""
    crc = crc32c.crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


class _Corrupt(Exception):
    """Raised inside the index parser; the reader turns it into a GPT2LabError naming the file."""


# ---------------------------------------------------------------------------------------- protobuf wire format


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    """Decode a base-128 varint at ``pos``; return (value, position after it)."""
    value = shift = 0
    while True:
        if pos >= len(buf):
            raise _Corrupt("varint runs past the end of its buffer")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise _Corrupt("varint longer than 10 bytes")


def _proto_fields(buf: bytes) -> Iterator[tuple[int, int | bytes]]:
    """(field number, value) for each field of a serialised protobuf message.

    Varints come back as unsigned ints, fixed32/fixed64 as little-endian unsigned ints and
    length-delimited fields as bytes (strings, packed arrays and nested messages alike).
    """
    pos = 0
    while pos < len(buf):
        tag, pos = _varint(buf, pos)
        field, wire_type = tag >> 3, tag & 7
        if wire_type == 0:
            value, pos = _varint(buf, pos)
        elif wire_type == 1:
            value, pos = int.from_bytes(buf[pos : pos + 8], "little"), pos + 8
        elif wire_type == 2:
            length, pos = _varint(buf, pos)
            value, pos = buf[pos : pos + length], pos + length
        elif wire_type == 5:
            value, pos = int.from_bytes(buf[pos : pos + 4], "little"), pos + 4
        else:
            raise _Corrupt(f"unsupported protobuf wire type {wire_type}")
        if pos > len(buf):
            raise _Corrupt("protobuf field runs past the end of its message")
        yield field, value


def _int64(value: int) -> int:
    """A varint decoded as unsigned, read back as the two's-complement int64 protobuf meant."""
    return value - (1 << 64) if value >= 1 << 63 else value


# ---------------------------------------------------------------------------------------- table (index file)


@dataclass(frozen=True)
class TFTensorEntry:
    """Where one tensor lives in a TF checkpoint (a decoded BundleEntryProto)."""

    name: str
    dtype: str  # numpy name, e.g. "float32"
    shape: tuple[int, ...]
    shard_id: int
    offset: int  # byte offset in the data shard
    size: int  # bytes
    crc32c: int  # masked CRC32C of the tensor's bytes
    sliced: bool = False  # a partitioned variable, stored as slices under other keys


def _block(data: bytes, handle: bytes) -> bytes:
    """The contents of the block a BlockHandle points at, after checking its trailer."""
    offset, pos = _varint(handle, 0)
    size, _ = _varint(handle, pos)
    end = offset + size
    if end + _BLOCK_TRAILER_SIZE > len(data):
        raise _Corrupt(f"block at {offset} (+{size} bytes) runs past the end of the file")
    contents, compression = data[offset:end], data[end]
    (stored_crc,) = struct.unpack_from("<I", data, end + 1)
    if masked_crc32c(data[offset : end + 1]) != stored_crc:
        raise _Corrupt(f"CRC mismatch in the block at byte {offset}")
    if compression != 0:
        raise _Corrupt(f"block at {offset} uses compression type {compression} (only uncompressed is supported)")
    return contents


def _block_entries(block: bytes) -> Iterator[tuple[bytes, bytes]]:
    """(key, value) pairs of a block. Each entry stores how many leading bytes its key shares with the
    previous key, then the rest of the key and the value; the restart array only speeds up seeks."""
    if len(block) < 4:
        raise _Corrupt("block shorter than its restart count")
    (num_restarts,) = struct.unpack_from("<I", block, len(block) - 4)
    end = len(block) - 4 * (num_restarts + 1)
    if end < 0:
        raise _Corrupt("restart array larger than its block")
    pos, key = 0, b""
    while pos < end:
        shared, pos = _varint(block, pos)
        unshared, pos = _varint(block, pos)
        value_size, pos = _varint(block, pos)
        if shared > len(key) or pos + unshared + value_size > end:
            raise _Corrupt(f"malformed block entry at byte {pos}")
        key = key[:shared] + block[pos : pos + unshared]
        pos += unshared
        yield key, block[pos : pos + value_size]
        pos += value_size


def _table_entries(data: bytes) -> Iterator[tuple[bytes, bytes]]:
    """Every (key, value) of a LevelDB table file, in key order: the index block maps each data
    block's last key (or a shorter separator) to the block's handle."""
    if len(data) < _FOOTER_SIZE:
        raise _Corrupt(f"{len(data)} bytes is shorter than the table footer")
    footer = data[-_FOOTER_SIZE:]
    (magic,) = struct.unpack_from("<Q", footer, _FOOTER_SIZE - 8)
    if magic != _TABLE_MAGIC:
        raise _Corrupt(f"bad magic number {magic:#x} (not a TensorFlow checkpoint index)")
    _, pos = _varint(footer, 0)  # metaindex handle: offset, size (the metaindex is unused by bundles)
    _, pos = _varint(footer, pos)
    for _, handle in _block_entries(_block(data, footer[pos:])):
        yield from _block_entries(_block(data, handle))


def _parse_header(value: bytes) -> tuple[int, int]:
    """(num_shards, endianness) of a BundleHeaderProto; proto3 leaves zero fields out."""
    num_shards, endianness = 1, 0
    for field, v in _proto_fields(value):
        if field == 1:
            num_shards = v
        elif field == 2:
            endianness = v
    return num_shards, endianness


def _parse_shape(value: bytes) -> tuple[int, ...]:
    """TensorShapeProto: repeated ``dim`` (field 2), each a Dim message with ``size`` (field 1)."""
    dims = []
    for field, dim in _proto_fields(value):
        if field == 2:
            size = 0
            for f, v in _proto_fields(dim):
                if f == 1:
                    size = _int64(v)
            dims.append(size)
        elif field == 3 and dim:
            raise _Corrupt("tensor of unknown rank")
    return tuple(dims)


def _parse_entry(name: str, value: bytes) -> TFTensorEntry:
    """A BundleEntryProto: dtype (1), shape (2), shard_id (3), offset (4), size (5), crc32c (6, fixed32),
    slices (7)."""
    fields: dict[str, Any] = dict(dtype=0, shape=(), shard_id=0, offset=0, size=0, crc32c=0, sliced=False)
    for field, v in _proto_fields(value):
        if field == 1:
            fields["dtype"] = v
        elif field == 2:
            fields["shape"] = _parse_shape(v)
        elif field in (3, 4, 5):
            fields[("shard_id", "offset", "size")[field - 3]] = _int64(v)
        elif field == 6:
            fields["crc32c"] = v
        elif field == 7:
            fields["sliced"] = True
    dtype = _TF_DTYPES.get(fields.pop("dtype"), "unknown")
    return TFTensorEntry(name=name, dtype=dtype, **fields)


# ---------------------------------------------------------------------------------------- reader


def _tf_prefix(path: Path) -> Path:
    """The checkpoint prefix (``.../model.ckpt``) for a folder, a prefix or an ``.index`` path."""
    if path.suffix == ".index" and path.is_file():
        return path.with_suffix("")
    if not path.is_dir():
        if Path(f"{path}.index").is_file():
            return path
        raise GPT2LabError(f"no TensorFlow checkpoint at {path} (no {path.name}.index)")
    pointer = path / "checkpoint"  # text proto: model_checkpoint_path: "model.ckpt"
    if pointer.is_file():
        m = re.search(r'^model_checkpoint_path:\s*"(.*)"', pointer.read_text(errors="replace"), re.MULTILINE)
        if m:
            named = Path(m.group(1))
            for prefix in (path / named, path / named.name):  # absolute paths from another machine: basename
                if Path(f"{prefix}.index").is_file():
                    return prefix
    indexes = sorted(path.glob("*.index"))
    if len(indexes) == 1:
        return indexes[0].with_suffix("")
    if not indexes:
        raise GPT2LabError(f"no TensorFlow checkpoint index (*.index) in {path}")
    raise GPT2LabError(f"{path} holds several checkpoints ({', '.join(p.name for p in indexes)}); pass one prefix")


class TFCheckpointReader:
    """Reads a TensorFlow checkpoint without TensorFlow.

    ``TFCheckpointReader(folder_or_prefix)`` parses the index at once: ``entries`` maps each tensor
    name to its :class:`TFTensorEntry` (in the index's byte order), ``num_shards`` and ``prefix`` describe
    the bundle. :meth:`read` returns one tensor as a numpy array after checking its size and CRC32C.
    """

    def __init__(self, folder_or_prefix: str | os.PathLike) -> None:
        self.prefix = _tf_prefix(Path(folder_or_prefix))
        self.index_path = Path(f"{self.prefix}.index")
        try:
            self.num_shards, self.entries = self._parse_index(self.index_path.read_bytes())
        except _Corrupt as err:
            raise GPT2LabError(f"{self.index_path} is not a valid TensorFlow checkpoint index: {err}") from None

    @staticmethod
    def _parse_index(data: bytes) -> tuple[int, dict[str, TFTensorEntry]]:
        num_shards, entries = None, {}
        for key, value in _table_entries(data):
            if key == b"":
                num_shards, endianness = _parse_header(value)
                if endianness != 0:
                    raise _Corrupt("big-endian bundles are not supported")
            else:
                name = key.decode("utf-8", errors="replace")
                entries[name] = _parse_entry(name, value)
        if num_shards is None:
            raise _Corrupt("no bundle header (the empty key)")
        return num_shards, entries

    def data_path(self, shard_id: int) -> Path:
        return Path(f"{self.prefix}.data-{shard_id:05d}-of-{self.num_shards:05d}")

    def read(self, name: str) -> np.ndarray:
        """The tensor ``name``, checked against the size and CRC32C recorded in the index."""
        entry = self.entries.get(name)
        if entry is None:
            raise GPT2LabError(f"no tensor '{name}' in {self.index_path}{closest_hint(name, self.entries)}")
        if entry.sliced:
            raise GPT2LabError(f"{name} is a partitioned variable (stored as slices), which is not supported")
        if entry.dtype in ("string", "bfloat16", "unknown"):
            raise GPT2LabError(f"{name} has dtype {entry.dtype}, which this reader does not support")
        dtype = np.dtype(entry.dtype).newbyteorder("<")
        expected = int(np.prod(entry.shape, dtype=np.int64)) * dtype.itemsize
        if entry.size != expected:
            raise GPT2LabError(f"{name}: the index records {entry.size} bytes, but {entry.shape} {dtype} is {expected}")
        array = np.empty(entry.shape, dtype=dtype)
        raw = array.reshape(-1).view(np.uint8)  # the array's own bytes: read in place, no copy
        self._read_into(entry, raw)
        if masked_crc32c(raw) != entry.crc32c:
            raise GPT2LabError(
                f"CRC32C mismatch for {name} in {self.data_path(entry.shard_id)}: the data file is corrupt"
            )
        return array

    def _read_into(self, entry: TFTensorEntry, out: np.ndarray) -> None:
        path = self.data_path(entry.shard_id)
        if not path.is_file():
            raise GPT2LabError(f"missing data file {path} (holds {entry.name})")
        with path.open("rb") as f:
            available = os.fstat(f.fileno()).st_size
            if available < entry.offset + entry.size:
                raise GPT2LabError(
                    f"truncated data file {path}: {entry.name} needs bytes {entry.offset}..{entry.offset + entry.size} "
                    f"but the file has {available}"
                )
            f.seek(entry.offset)
            if f.readinto(out) != entry.size:
                raise GPT2LabError(f"short read of {entry.name} from {path}")


def _is_model_tensor(name: str) -> bool:
    """OpenAI's weights live under model/; fine-tuning scripts add global_step and optimizer slots."""
    return name.startswith("model/") and not re.search(r"/(Adam|Momentum|RMSProp)(_\d+)?$", name)


def _read_tf(source: _Source) -> tuple[GPTConfig, dict[str, torch.Tensor]]:
    reader = TFCheckpointReader(source.weights[0])
    if not source.config.is_file():
        raise GPT2LabError(f"{source.config} is missing: it gives the model's shape (n_vocab, n_ctx, n_embd, ...)")
    hparams = _read_json(source.config)
    keys = ("n_vocab", "n_ctx", "n_embd", "n_head", "n_layer")
    if absent := [k for k in keys if k not in hparams]:
        raise GPT2LabError(f"{source.config} lacks {', '.join(absent)}")
    config = GPTConfig(
        vocab_size=hparams["n_vocab"],
        block_size=hparams["n_ctx"],
        n_embd=hparams["n_embd"],
        n_head=hparams["n_head"],
        n_layer=hparams["n_layer"],
    )
    found = {name: e.shape for name, e in reader.entries.items() if _is_model_tensor(name)}
    return config, _collect_state(
        config, found, lambda name: torch.from_numpy(reader.read(name)), _TF, str(reader.index_path)
    )


_READERS: dict[str, Callable[[_Source], tuple[GPTConfig, dict[str, torch.Tensor]]]] = {
    "gpt2lab": _read_gpt2lab,
    "hf": _read_hf,
    "tf": _read_tf,
}


# ======================================================================================== files


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise GPT2LabError(f"cannot read {path}: {_one_line(str(err))}") from err
    if not isinstance(value, dict):
        raise GPT2LabError(f"{path} does not hold a JSON object")
    return value


@contextmanager
def _atomic(path: Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success, flush it to disk and rename it over
    ``path`` (atomic on POSIX within one filesystem). On failure the old file is untouched."""
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with tmp.open("rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _write_safetensors(path: Path, state: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    with _atomic(path) as tmp:
        save_file(state, tmp, metadata={"format": "pt"})


def _write_json(path: Path, value: dict[str, Any]) -> None:
    with _atomic(path) as tmp:
        tmp.write_text(json.dumps(value, indent=2) + "\n")
