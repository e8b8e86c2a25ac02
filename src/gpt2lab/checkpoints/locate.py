"""What a checkpoint name is: an existing file or folder, a TensorFlow prefix, or a Hugging Face hub id,
and for hub ids the hub itself (download, cache, fail fast offline).

* **Hub ids** (``gpt2``, ``openai-community/gpt2-medium``, any ``org/name``) are downloaded through
  ``huggingface_hub``'s cache. Offline, the hub is asked once with a short timeout and no retries, the
  cache is the fallback, and otherwise the load fails at once.
* **Local paths** are classified by the files they hold: ``config.json`` with weights (hub layout, or
  gpt2lab's own when the config carries its marker), or an OpenAI TF checkpoint.

Nothing is read here but the small files that say what a checkpoint is; the readers read the rest.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from gpt2lab.checkpoints.native import is_gpt2lab_config
from gpt2lab.checkpoints.tf_bundle import tf_prefix
from gpt2lab.errors import GPT2LabError, closest_hint
from gpt2lab.files import inside, one_line, read_json
from gpt2lab.outputs import CONFIG_FILE, PICKLED_WEIGHTS_FILE, WEIGHTS_FILE, WEIGHTS_INDEX_FILE

__all__ = ["HUB_TIMEOUT_S", "LEGACY_HUB_NAMES", "Source", "locate"]

# Seconds to wait for the hub's first answer. huggingface_hub's own default (10 s, then up to five
# retries with back-off, about 25 s in all) is what makes an offline ``from_pretrained("gpt2")`` hang.
HUB_TIMEOUT_S = 5.0

# Names the hub still resolves without an organisation (they redirect to openai-community/ and
# distilbert/). Any other bare name is a typo, not a download to attempt.
LEGACY_HUB_NAMES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl", "distilgpt2")

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
_HF_WEIGHT_FILES = (WEIGHTS_FILE, WEIGHTS_INDEX_FILE, PICKLED_WEIGHTS_FILE)
_OFFLINE_ADVICE = "pass a local folder with config.json + model.safetensors, or an OpenAI TF checkpoint folder"


@dataclass(frozen=True)
class Source:
    """A checkpoint found on disk: which reader, its config file, and its weight files.

    ``kind`` is ``"gpt2lab"``, ``"hf"`` or ``"tf"``; for ``"tf"`` ``weights`` holds the checkpoint prefix
    (``.../model.ckpt``).
    """

    kind: str
    config: Path
    weights: tuple[Path, ...]


def locate(name: str) -> Source:
    """Decide what ``name`` is: an existing path, a TF prefix, a hub id, or nothing we know."""
    path = Path(name).expanduser()
    if path.exists():
        return _local_source(path)
    if Path(f"{path}.index").is_file():  # a TF prefix such as .../model.ckpt
        return _tf_source(path)
    looks_like_path = name.startswith((".", "/", "~")) or path.suffix in (".safetensors", ".bin", ".json", ".index")
    if looks_like_path or not _HUB_ID.match(name):
        raise GPT2LabError(f"unknown model '{name}': no such file or folder, and not a Hugging Face hub id (org/name)")
    if "/" in name and path.parent.is_dir():  # 'runs/my-rum': a local folder's typo, not an org on the hub
        hint = closest_hint(path.name, [p.name for p in path.parent.iterdir()])
        raise GPT2LabError(f"no such file or folder: {name}{hint} (a local folder {path.parent}/ exists)")
    if "/" not in name and name not in LEGACY_HUB_NAMES:
        raise GPT2LabError(
            f"unknown model '{name}'{closest_hint(name, LEGACY_HUB_NAMES)}: no such file or folder; hub ids are "
            f"'org/name' (or one of {', '.join(LEGACY_HUB_NAMES)})"
        )
    return _hub_source(name)


def _local_source(path: Path) -> Source:
    """Classify an existing file or folder by the files it holds."""
    if path.is_file():
        if path.name == CONFIG_FILE:
            return _local_source(path.parent)
        if path.suffix == ".index":
            return _tf_source(path.with_suffix(""))
        if path.suffix in (".safetensors", ".bin"):
            return _source_from_config(path.parent / CONFIG_FILE, (path,))
        raise GPT2LabError(f"{path}: not a checkpoint file (expected .safetensors, .bin or a TF .index)")
    folder = path
    if (folder / CONFIG_FILE).is_file():
        inside(folder, folder / CONFIG_FILE)
        for weights in _HF_WEIGHT_FILES:
            if (folder / weights).is_file():
                files = _expand_shards(inside(folder, folder / weights))
                return _source_from_config(folder / CONFIG_FILE, tuple(inside(folder, f) for f in files))
        raise GPT2LabError(f"{folder} has config.json but no {', '.join(_HF_WEIGHT_FILES)}")
    if (folder / "hparams.json").is_file() or any(folder.glob("*.index")):
        return _tf_source(folder)
    raise GPT2LabError(
        f"no checkpoint in {folder}: expected config.json + model.safetensors or pytorch_model.bin, "
        "or an OpenAI TF checkpoint (hparams.json + model.ckpt.index/.data-*)"
    )


def _source_from_config(config: Path, weights: tuple[Path, ...]) -> Source:
    """A hub-layout or gpt2lab checkpoint, told apart by its config."""
    if not config.is_file():
        raise GPT2LabError(f"{weights[0]} has no config.json next to it (needed for the model's shape)")
    kind = "gpt2lab" if is_gpt2lab_config(read_json(config)) else "hf"
    return Source(kind, config, weights)


def _expand_shards(weights: Path) -> tuple[Path, ...]:
    """The files behind a weights path: a sharded index names its shards, anything else is itself."""
    if not weights.name.endswith(".index.json"):
        return (weights,)
    weight_map = read_json(weights).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise GPT2LabError(f"{weights}: no weight_map in the shard index")
    names = dict.fromkeys(weight_map.values())
    if not all(isinstance(name, str) and name for name in names):
        raise GPT2LabError(f"{weights}: the weight_map names a shard that is not a file name")
    return tuple(inside(weights.parent, weights.parent / shard, "the shard") for shard in names)


def _tf_source(path: Path) -> Source:
    prefix = tf_prefix(path)
    for file in (Path(f"{prefix}.index"), prefix.parent / "hparams.json"):
        inside(prefix.parent, file)
    return Source("tf", prefix.parent / "hparams.json", (prefix,))


# ---------------------------------------------------------------------------------------- the hub


def _hub_source(repo_id: str) -> Source:
    """Download (or find in the cache) config.json and the weights of ``repo_id``."""
    offline_reason = _hub_unreachable(repo_id)
    config = _hub_file(repo_id, CONFIG_FILE, offline_reason)
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
        get_hf_file_metadata(hf_hub_url(repo_id, CONFIG_FILE), timeout=HUB_TIMEOUT_S)
    except RepositoryNotFoundError as err:
        raise GPT2LabError(
            f"no model '{repo_id}' on the Hugging Face hub (or it is private or gated: log in with `hf auth login`)"
        ) from err
    except RemoteEntryNotFoundError:
        return None  # the repo exists; _hub_source reports the missing config.json
    except Exception as err:  # any failure to get an answer means: work from the cache
        return one_line(f"{type(err).__name__}: {err}")
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
            f"could not download {filename} of '{repo_id}': {one_line(f'{type(err).__name__}: {err}')}"
        ) from err


def _offline_error(repo_id: str, reason: str) -> GPT2LabError:
    return GPT2LabError(
        f"could not download '{repo_id}' from the Hugging Face hub (offline? {reason}); {_OFFLINE_ADVICE}"
    )
