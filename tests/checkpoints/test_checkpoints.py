"""Checkpoint formats: gpt2lab's own, the hub layout, OpenAI's TensorFlow bundles, and the hub itself.

Equality with transformers lives in test_parity_hf.py; here every format is exercised without it.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import shlex
import shutil
import struct
import subprocess
import sys
import threading
import urllib.parse
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from tf_checkpoint_writer import build_table, bundle_entry, bundle_header, varint, write_bundle, write_gpt2_checkpoint

from gpt2lab import GPT, GPT2LabError, GPTConfig
from gpt2lab import checkpoints as ckpt
from gpt2lab.checkpoints import TFCheckpointReader, tf_bundle

TINY = dict(n_layer=2, n_head=4, n_embd=32, block_size=32, vocab_size=96)
VARIANTS = {
    "gpt2": {},
    "rope-gqa": dict(pos_encoding="rope", n_kv_head=2, rope_theta=500.0),
    "mqa-window": dict(n_kv_head=1, window=8),
    "window-per-layer": dict(pos_encoding="rope", window=[4, None]),
    "dropout-eps": dict(dropout=0.1, layer_norm_epsilon=1e-6),
}
TF_REAL = "gpt2-124M-tf"


def random_model(seed: int = 0, **overrides) -> GPT:
    """A model whose every tensor is random. Default init leaves LayerNorm gains at 1 and biases at 0,
    which would hide a loader that swaps or drops them; here each one moves the logits."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**{**TINY, **overrides}))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".ln_" in name and name.endswith("weight"):
                p.normal_(1.0, 0.1)
            else:
                p.normal_(0.0, 0.2 if p.dim() > 1 else 0.1)
    return model.eval()


def tokens(config: GPTConfig, batch: int = 2, length: int = 12) -> torch.Tensor:
    return torch.randint(config.vocab_size, (batch, length), generator=torch.Generator().manual_seed(1))


def assert_same_model(loaded: GPT, source: GPT) -> None:
    assert loaded.config == source.config
    a, b = loaded.state_dict(), source.state_dict()
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert loaded.lm_head.weight is loaded.transformer.wte.weight  # still tied
    idx = tokens(source.config)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(idx), source.eval()(idx))


def one_line_error(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


# ======================================================================================== shapes


@pytest.mark.parametrize("variant", VARIANTS)
def test_gpt_state_shapes_match_the_model(variant):
    config = GPTConfig(**{**TINY, **VARIANTS[variant]})
    model_shapes = {n: tuple(t.shape) for n, t in GPT(config).state_dict().items() if n != "lm_head.weight"}
    assert ckpt.gpt_state_shapes(config) == model_shapes


# ======================================================================================== gpt2lab format


@pytest.mark.parametrize("variant", VARIANTS)
def test_save_pretrained_round_trips_every_variant(tmp_path, variant):
    model = random_model(**VARIANTS[variant])
    model.save_pretrained(tmp_path / "run")
    loaded = GPT.from_pretrained(tmp_path / "run")
    assert_same_model(loaded, model)


def test_saved_files_hold_the_tied_weight_once_and_a_format_marker(tmp_path):
    model = random_model()
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["format"] == "gpt2lab" and config["n_embd"] == 32
    tensors = load_file(tmp_path / "model.safetensors")
    assert "lm_head.weight" not in tensors and "transformer.wte.weight" in tensors
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]  # no temp files
    assert_same_model(GPT.from_pretrained(tmp_path), model)


def test_a_compiled_model_saves_under_its_own_names(tmp_path):
    """torch.compile returns a wrapper that keeps the model as ``_orig_mod``, prefixes every state
    dict name with it and forwards any other attribute to the model. A stand-in with that shape keeps
    this test free of dynamo's import (~7 s)."""

    class Compiled(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self._orig_mod = model

        def __getattr__(self, name):  # as torch._dynamo's OptimizedModule.__getattr__
            if name == "_orig_mod":
                return self._modules["_orig_mod"]
            return getattr(self._orig_mod, name)

    model = random_model()
    assert next(iter(Compiled(model).state_dict())).startswith("_orig_mod.")
    Compiled(model).save_pretrained(tmp_path)
    assert_same_model(GPT.from_pretrained(tmp_path), model)


def test_a_failed_save_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    old = random_model(seed=1)
    old.save_pretrained(tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def disk_full(state, path, metadata=None):
        Path(path).write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("safetensors.torch.save_file", disk_full)
    with pytest.raises(GPT2LabError, match="No space left on device") as excinfo:  # atomic_file's one line
        random_model(seed=2).save_pretrained(tmp_path)
    assert isinstance(excinfo.value.__cause__, OSError)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    assert_same_model(GPT.from_pretrained(tmp_path), old)


def test_dtype_and_device_are_applied_after_loading(tmp_path):
    model = random_model()
    model.save_pretrained(tmp_path)
    loaded = GPT.from_pretrained(tmp_path, dtype="bf16", device="cpu")
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    assert loaded.lm_head.weight is loaded.transformer.wte.weight
    assert torch.equal(loaded.transformer.wte.weight, model.transformer.wte.weight.to(torch.bfloat16))
    assert GPT.from_pretrained(tmp_path, dtype=torch.float64).lm_head.weight.dtype == torch.float64
    with pytest.raises(GPT2LabError, match="unknown dtype 'bf61'"):
        GPT.from_pretrained(tmp_path, dtype="bf61")


# ======================================================================================== hub layout


def hf_folder(tmp_path: Path, model: GPT | None = None) -> tuple[Path, GPT]:
    model = model or random_model()
    folder = tmp_path / "hf"
    model.export_hf(folder)
    return folder, model


def edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **changes}))


def test_export_hf_writes_transformers_names_and_config(tmp_path):
    folder, model = hf_folder(tmp_path)
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["GPT2LMHeadModel"] and config["model_type"] == "gpt2"
    assert config["activation_function"] == "gelu_new"
    assert (config["n_positions"], config["n_ctx"], config["n_layer"]) == (32, 32, 2)
    tensors = load_file(folder / "model.safetensors")
    assert "lm_head.weight" not in tensors
    # Conv1D: (in, out)
    assert tensors["transformer.h.0.mlp.c_fc.weight"].shape == (32, 128)
    assert torch.equal(tensors["transformer.h.1.attn.c_attn.weight"], model.transformer.h[1].attn.c_attn.weight.t())


def test_hub_layout_folder_and_file_load(tmp_path):
    folder, model = hf_folder(tmp_path)
    assert_same_model(GPT.from_pretrained(folder), model)
    assert_same_model(GPT.from_pretrained(folder / "model.safetensors"), model)
    assert_same_model(GPT.from_pretrained(folder / "config.json"), model)


@pytest.mark.parametrize(
    "variant, message",
    [
        ("mqa-window", r"a sliding window \(window=8\) with learned positions exists in no transformers"),
        ("window-per-layer", r"per-layer windows \(\[4, None\]\) exist in no transformers architecture"),
    ],
)
def test_export_hf_refuses_what_no_transformers_architecture_computes(tmp_path, variant, message):
    with pytest.raises(GPT2LabError, match=message) as excinfo:
        random_model(**VARIANTS[variant]).export_hf(tmp_path)
    one_line_error(excinfo)
    assert not (tmp_path / "model.safetensors").exists()


def test_bin_without_prefix_with_legacy_buffers_and_tied_head(tmp_path):
    """GPT2Model-style names, the old attn.bias/masked_bias buffers and a tied lm_head are all accepted."""
    folder, model = hf_folder(tmp_path)
    state = {k.removeprefix("transformer."): v for k, v in load_file(folder / "model.safetensors").items()}
    for i in range(model.config.n_layer):
        state[f"h.{i}.attn.bias"] = torch.tril(torch.ones(1, 1, 32, 32))
        state[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    state["lm_head.weight"] = state["wte.weight"].clone()
    (folder / "model.safetensors").unlink()
    torch.save(state, folder / "pytorch_model.bin")
    assert_same_model(GPT.from_pretrained(folder), model)
    assert_same_model(GPT.from_pretrained(folder / "pytorch_model.bin"), model)

    state["lm_head.weight"] = state["lm_head.weight"] + 1
    torch.save(state, folder / "pytorch_model.bin")
    with pytest.raises(GPT2LabError, match="lm_head.weight differs from wte.weight"):
        GPT.from_pretrained(folder)


def test_sharded_safetensors(tmp_path):
    folder, model = hf_folder(tmp_path)
    tensors = load_file(folder / "model.safetensors")
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for shard, shard_names in shards.items():
        save_file({n: tensors[n] for n in shard_names}, folder / shard, metadata={"format": "pt"})
    weight_map = {n: shard for shard, shard_names in shards.items() for n in shard_names}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (folder / "model.safetensors").unlink()
    assert_same_model(GPT.from_pretrained(folder), model)


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(model_type="llama"), "describes a 'llama' model"),
        (dict(activation_function="silu"), "activation_function 'silu'"),
        (dict(activation_function=["relu"]), r"activation_function '\['relu'\]'"),
        (dict(n_inner=100), "n_inner 100"),
        (dict(scale_attn_weights=False), "scale_attn_weights false"),
        (dict(scale_attn_by_inverse_layer_idx=True), "scale_attn_by_inverse_layer_idx"),
        (dict(add_cross_attention=True), "add_cross_attention"),
        (dict(tie_word_embeddings=False), "tie_word_embeddings false"),
    ],
)
def test_hf_configs_gpt2lab_cannot_represent_are_refused(tmp_path, changes, message):
    folder, _ = hf_folder(tmp_path)
    edit_config(folder, **changes)
    with pytest.raises(GPT2LabError, match=message) as excinfo:
        GPT.from_pretrained(folder)
    one_line_error(excinfo)


def test_hf_configs_that_only_change_precision_or_naming_are_accepted(tmp_path):
    folder, model = hf_folder(tmp_path)
    edit_config(folder, activation_function="gelu_pytorch_tanh", reorder_and_upcast_attn=True, n_inner=128)
    assert_same_model(GPT.from_pretrained(folder), model)
    config = json.loads((folder / "config.json").read_text())
    del config["n_positions"], config["layer_norm_epsilon"]  # n_ctx only, eps left at transformers' default
    (folder / "config.json").write_text(json.dumps(config))
    assert GPT.from_pretrained(folder).config.block_size == 32


def test_every_missing_unexpected_and_misshaped_tensor_is_named_in_one_line(tmp_path):
    folder, _ = hf_folder(tmp_path)
    tensors = load_file(folder / "model.safetensors")
    del tensors["transformer.h.1.ln_1.weight"]
    del tensors["transformer.ln_f.bias"]
    tensors["transformer.h.0.extra.weight"] = torch.zeros(3)
    tensors["transformer.h.0.attn.c_attn.weight"] = tensors["transformer.h.0.attn.c_attn.weight"].t().contiguous()
    tensors["transformer.wpe.weight"] = tensors["transformer.wpe.weight"][:16].contiguous()
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(GPT2LabError) as excinfo:
        GPT.from_pretrained(folder)
    message = one_line_error(excinfo)
    assert "does not match the config" in message
    assert "missing h.1.ln_1.weight, ln_f.bias" in message
    assert "unexpected h.0.extra.weight" in message
    assert "shape of h.0.attn.c_attn.weight is (96, 32), expected (32, 96)" in message
    assert "shape of wpe.weight is (16, 32), expected (32, 32)" in message


def test_a_config_with_more_layers_lists_the_missing_layers_compactly(tmp_path):
    folder, _ = hf_folder(tmp_path)
    edit_config(folder, n_layer=5)
    with pytest.raises(GPT2LabError) as excinfo:
        GPT.from_pretrained(folder)
    message = one_line_error(excinfo)
    assert "missing h.[2-4].ln_1.weight, h.[2-4].ln_1.bias, h.[2-4].attn.c_attn.weight" in message
    assert message.count("h.[2-4].") == 12  # every tensor of the three layers


def test_a_pickle_carrying_code_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {shlex.quote(str(marker))}",)

    folder, _ = hf_folder(tmp_path)
    (folder / "model.safetensors").unlink()
    torch.save({"wte.weight": torch.zeros(96, 32), "payload": Payload()}, folder / "pytorch_model.bin")
    with pytest.raises(GPT2LabError, match="refusing to load .*pytorch_model.bin") as excinfo:
        GPT.from_pretrained(folder)
    one_line_error(excinfo)
    assert not marker.exists()
    # The payload is live: an unrestricted unpickler runs it (which is why weights_only matters).
    torch.load(folder / "pytorch_model.bin", weights_only=False)
    assert marker.exists()


def test_unreadable_weight_files_give_one_line(tmp_path):
    folder, _ = hf_folder(tmp_path)
    (folder / "model.safetensors").write_bytes(b"\x00" * 100)
    with pytest.raises(GPT2LabError, match="not a readable safetensors file") as excinfo:
        GPT.from_pretrained(folder)
    one_line_error(excinfo)
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"not a zip, not a pickle")
    with pytest.raises(GPT2LabError, match="pytorch_model.bin") as excinfo:
        GPT.from_pretrained(folder)
    one_line_error(excinfo)


# ======================================================================================== naming a model


@pytest.mark.parametrize(
    "name, message",
    [
        ("gtp2", r"unknown model 'gtp2' \(did you mean 'gpt2'\?\)"),
        ("a/b/c", "unknown model 'a/b/c': no such file or folder"),
        ("./no/such/folder", "unknown model './no/such/folder': no such file or folder"),
        ("weights.safetensors", "no such file or folder"),
    ],
)
def test_names_that_are_neither_paths_nor_hub_ids(name, message):
    with pytest.raises(GPT2LabError, match=message):
        GPT.from_pretrained(name)


def test_a_folder_without_a_checkpoint(tmp_path):
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(GPT2LabError, match="no checkpoint in .*expected config.json"):
        GPT.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(GPT2LabError, match="has config.json but no model.safetensors"):
        GPT.from_pretrained(tmp_path)


HUB_SCRIPT = """
import sys, time
import huggingface_hub  # imported up front: the time measured is the loader's, not the import's
from gpt2lab import GPT
from gpt2lab.errors import GPT2LabError
for name in sys.argv[1:]:
    start = time.perf_counter()
    try:
        model = GPT.from_pretrained(name)
        result = f"LOADED {sum(t.double().sum().item() for t in model.state_dict().values())!r}"
    except GPT2LabError as err:
        result = f"ERROR {err}"
    print(f"{time.perf_counter() - start:.3f} {result}")
"""


def checksum(model: GPT) -> str:
    """What HUB_SCRIPT prints for a model that loaded."""
    return f"LOADED {sum(t.double().sum().item() for t in model.state_dict().values())!r}"


def run_hub_scripts(cases: dict[str, tuple[dict, list[str]]]) -> dict[str, list[tuple[float, str]]]:
    """Run the loader in fresh interpreters (huggingface_hub reads its environment at import), in
    parallel; return, per case, the seconds each load_pretrained call took and its outcome."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_", "TRANSFORMERS_"))}
    procs = {
        case: subprocess.Popen(
            [sys.executable, "-c", HUB_SCRIPT, *names],
            env={**base, **env},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for case, (env, names) in cases.items()
    }
    results = {}
    for case, proc in procs.items():
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err.decode()[-2000:]
        lines = [line.split(" ", 1) for line in out.decode().strip().splitlines()]
        results[case] = [(float(seconds), outcome) for seconds, outcome in lines]
    return results


class FakeHub(http.server.BaseHTTPRequestHandler):
    """Enough of the hub's /{org}/{name}/resolve/{revision}/{file} protocol for hf_hub_download: the
    commit and ETag headers on HEAD and GET, and the X-Error-Code that tells a missing repo from a
    missing file."""

    repos: dict[str, dict[str, bytes]] = {}
    downloads: list[str] = []

    def do_HEAD(self):
        self.answer(send_body=False)

    def do_GET(self):
        self.answer(send_body=True)

    def answer(self, send_body: bool) -> None:
        parts = [urllib.parse.unquote(p) for p in self.path.split("?")[0].split("/")]
        repo, filename = "/".join(parts[1:3]), "/".join(parts[5:])  # /org/name/resolve/<revision>/<file>
        files = self.repos.get(repo)
        body = None if files is None else files.get(filename)
        if files is None:
            status, headers = 404, {"X-Error-Code": "RepoNotFound"}
        elif body is None:
            status, headers = 404, {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": "b" * 40}
        else:
            status, headers = 200, {"X-Repo-Commit": "b" * 40, "ETag": f'"{hashlib.sha256(body).hexdigest()}"'}
            if send_body:
                self.downloads.append(f"{repo}/{filename}")
        body = body or b""
        self.send_response(status)
        for key, value in {**headers, "Content-Length": str(len(body))}.items():
            self.send_header(key, value)
        self.end_headers()
        if send_body:
            self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def fake_hub():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    FakeHub.repos, FakeHub.downloads = {}, []
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_hub_ids_download_fail_fast_offline_and_load_from_the_cache(tmp_path, fake_hub):
    """Online (a local stand-in for the hub) a repo downloads, safetensors or .bin; offline
    (HF_HUB_OFFLINE, or a hub that refuses connections) a download fails in well under a second with
    one line; a repo already in the cache loads either way."""
    model = random_model()
    folder, _ = hf_folder(tmp_path, model)
    config, weights = (folder / "config.json").read_bytes(), (folder / "model.safetensors").read_bytes()
    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    FakeHub.repos = {
        "gpt2lab-tests/safe": {"config.json": config, "model.safetensors": weights, "pytorch_model.bin": b"unused"},
        "gpt2lab-tests/bin": {"config.json": config, "pytorch_model.bin": (folder / "pytorch_model.bin").read_bytes()},
    }
    cached = tmp_path / "hf_home_cached"
    snapshot = cached / "hub" / "models--gpt2lab-tests--tiny" / "snapshots" / ("a" * 40)
    shutil.copytree(folder, snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("a" * 40)
    offline = {"HF_HOME": str(cached), "HF_HUB_OFFLINE": "1"}
    unreachable = {"HF_HOME": str(cached), "HF_ENDPOINT": "http://127.0.0.1:9"}
    online = {"HF_HOME": str(tmp_path / "hf_home_online"), "HF_ENDPOINT": fake_hub}
    results = run_hub_scripts(
        {
            "offline": (offline, ["gpt2", "gpt2lab-tests/tiny"]),
            "unreachable": (unreachable, ["openai-community/gpt2", "gpt2lab-tests/tiny"]),
            "online": (online, ["gpt2lab-tests/safe", "gpt2lab-tests/bin", "gpt2lab-tests/nope", "gpt2lab-tests/safe"]),
        }
    )
    advice = "pass a local folder with config.json + model.safetensors, or an OpenAI TF checkpoint folder"
    for case, name in (("offline", "gpt2"), ("unreachable", "openai-community/gpt2")):
        (seconds, outcome), (_, from_cache) = results[case]
        assert outcome.startswith(f"ERROR could not download '{name}' from the Hugging Face hub (offline?"), outcome
        assert outcome.endswith(advice)
        assert seconds < 10.0, (case, seconds)  # huggingface_hub alone retries for ~23 s here
        assert from_cache == checksum(model), case
    assert "HF_HUB_OFFLINE is set" in results["offline"][0][1]
    assert "ConnectError" in results["unreachable"][0][1]

    safe, bin_, nope, safe_again = (outcome for _, outcome in results["online"])
    assert safe == bin_ == safe_again == checksum(model)
    assert nope.startswith("ERROR no model 'gpt2lab-tests/nope' on the Hugging Face hub")
    # Only what is needed is fetched, once: the second load of gpt2lab-tests/safe comes from the cache.
    assert sorted(FakeHub.downloads) == [
        "gpt2lab-tests/bin/config.json",
        "gpt2lab-tests/bin/pytorch_model.bin",
        "gpt2lab-tests/safe/config.json",
        "gpt2lab-tests/safe/model.safetensors",
    ]


# ======================================================================================== OpenAI TF: the real index


@pytest.fixture
def real_tf(shared_data, tmp_path) -> Path:
    """OpenAI's genuine 124M index with the first 3 MiB of its data file, under the names TF uses."""
    source = shared_data / TF_REAL
    if not source.is_dir():
        pytest.skip(f"{source} not found")
    folder = tmp_path / "tf"
    folder.mkdir()
    # copies, not links: a link out of a checkpoint folder is refused (checkpoint folders are closed)
    for name in ("checkpoint", "hparams.json", "model.ckpt.index"):
        shutil.copyfile(source / name, folder / name)
    shutil.copyfile(source / "model.ckpt.data-00000-of-00001.first-3MiB", folder / "model.ckpt.data-00000-of-00001")
    return folder


def test_real_index_lists_148_float32_tensors_with_their_shapes(real_tf):
    reader = TFCheckpointReader(real_tf)
    assert reader.prefix == real_tf / "model.ckpt" and reader.num_shards == 1
    entries = reader.entries
    assert len(entries) == 148
    assert list(entries) == sorted(entries)  # byte order: h0, h1, h10, h11, h2, ...
    assert {e.dtype for e in entries.values()} == {"float32"}
    assert entries["model/wte"].shape == (50257, 768)
    assert entries["model/wpe"].shape == (1024, 768)
    assert entries["model/h0/attn/c_attn/w"].shape == (1, 768, 2304)
    assert entries["model/h11/mlp/c_proj/w"].shape == (1, 3072, 768)
    assert entries["model/ln_f/g"].shape == (768,)
    first = entries["model/h0/attn/c_attn/b"]
    assert (first.offset, first.size, first.shape) == (0, 9216, (2304,))
    # The tensors tile the 497,759,232-byte data file in name order.
    ordered = list(entries.values())
    assert all(a.offset + a.size == b.offset for a, b in zip(ordered, ordered[1:], strict=False))
    assert ordered[-1].offset + ordered[-1].size == 497_759_232
    for name, e in entries.items():
        assert e.size == 4 * int(np.prod(e.shape)), name


def test_real_first_tensor_reads_and_passes_its_crc(real_tf):
    bias = TFCheckpointReader(real_tf).read("model/h0/attn/c_attn/b")
    assert bias.dtype == np.float32 and bias.shape == (2304,)
    assert np.isfinite(bias).all() and bias.std() > 0.1


def test_real_cut_off_tensor_is_a_clear_truncation_error(real_tf):
    reader = TFCheckpointReader(real_tf)
    with pytest.raises(GPT2LabError, match="truncated data file .*model/h0/attn/c_attn/w needs bytes 9216..7087104"):
        reader.read("model/h0/attn/c_attn/w")
    with pytest.raises(GPT2LabError, match="truncated data file .*model/wte") as excinfo:
        GPT.from_pretrained(real_tf)  # 124M config; wte is read first and is cut off
    one_line_error(excinfo)


def test_real_data_with_a_flipped_byte_fails_its_crc(real_tf):
    data = real_tf / "model.ckpt.data-00000-of-00001"
    corrupt = bytearray(data.read_bytes()[:16384])
    corrupt[100] ^= 0x01
    data.unlink()
    data.write_bytes(bytes(corrupt))
    with pytest.raises(GPT2LabError, match="CRC32C mismatch for model/h0/attn/c_attn/b"):
        TFCheckpointReader(real_tf).read("model/h0/attn/c_attn/b")


def test_writer_rebuilds_the_real_index_byte_for_byte(real_tf):
    """The test writer, fed the entries parsed from OpenAI's index, produces that exact file: the
    reader's reading and the writer's conventions (key order, prefix compression, restart interval,
    proto field encoding, separators, CRCs, footer) are TensorFlow's."""
    reader = TFCheckpointReader(real_tf)
    items = [(b"", bundle_header(reader.num_shards))]
    for name, e in reader.entries.items():
        items.append((name.encode(), bundle_entry(e.dtype, e.shape, e.shard_id, e.offset, e.size, e.crc32c)))
    assert build_table(items) == (real_tf / "model.ckpt.index").read_bytes()


def test_a_corrupt_index_is_reported_as_such(real_tf, tmp_path):
    index = bytearray((real_tf / "model.ckpt.index").read_bytes())
    broken = tmp_path / "broken"
    broken.mkdir()
    index[200] ^= 0xFF
    (broken / "model.ckpt.index").write_bytes(bytes(index))
    with pytest.raises(GPT2LabError, match="not a valid TensorFlow checkpoint index: CRC mismatch in the block"):
        TFCheckpointReader(broken)
    (broken / "model.ckpt.index").write_bytes(b"\x00" * 100)
    with pytest.raises(GPT2LabError, match="bad magic number"):
        TFCheckpointReader(broken / "model.ckpt")


# ======================================================================================== OpenAI TF: end to end


def test_tf_checkpoint_loads_into_the_same_model(tmp_path):
    model = random_model()
    folder = write_gpt2_checkpoint(model, tmp_path / "tf")
    assert_same_model(GPT.from_pretrained(folder), model)
    assert_same_model(GPT.from_pretrained(folder / "model.ckpt"), model)  # a prefix
    assert_same_model(GPT.from_pretrained(folder / "model.ckpt.index"), model)
    reader = TFCheckpointReader(folder)
    w = reader.read("model/h1/attn/c_attn/w")
    assert w.shape == (1, 32, 96)
    assert np.array_equal(w[0].T, model.transformer.h[1].attn.c_attn.weight.detach().numpy())


def test_tf_index_with_many_blocks(tmp_path):
    model = random_model()
    folder = write_gpt2_checkpoint(model, tmp_path / "tf", block_size=256)
    data = (folder / "model.ckpt.index").read_bytes()
    footer = data[-48:]
    _, pos = tf_bundle._varint(footer, 0)
    _, pos = tf_bundle._varint(footer, pos)
    assert len(list(tf_bundle._block_entries(tf_bundle._block(data, footer[pos:])))) >= 3  # data blocks
    assert_same_model(GPT.from_pretrained(folder), model)


def test_tf_optimizer_slots_are_skipped_and_missing_tensors_named(tmp_path):
    model = random_model()
    slot = np.zeros((1, 32, 96), np.float32)
    extra = {"model/h0/attn/c_attn/w/Adam": slot, "model/h0/attn/c_attn/w/Adam_1": slot, "global_step": np.int64(7)}
    folder = write_gpt2_checkpoint(model, tmp_path / "tf", extra=extra)
    assert_same_model(GPT.from_pretrained(folder), model)

    tensors = {n: TFCheckpointReader(folder).read(n) for n in TFCheckpointReader(folder).entries}
    del tensors["model/h1/ln_2/g"]
    tensors["model/h0/mlp/c_fc/w"] = tensors["model/h0/mlp/c_fc/w"][0]
    write_bundle(folder / "model.ckpt", tensors)
    with pytest.raises(GPT2LabError) as excinfo:
        GPT.from_pretrained(folder)
    message = one_line_error(excinfo)
    assert "missing model/h1/ln_2/g" in message
    assert "shape of model/h0/mlp/c_fc/w is (32, 128), expected (1, 32, 128)" in message


def test_tf_missing_data_file_and_hparams(tmp_path):
    folder = write_gpt2_checkpoint(random_model(), tmp_path / "tf")
    (folder / "model.ckpt.data-00000-of-00001").unlink()
    with pytest.raises(GPT2LabError, match="missing data file .*model.ckpt.data-00000-of-00001"):
        GPT.from_pretrained(folder)
    (folder / "hparams.json").unlink()
    with pytest.raises(GPT2LabError, match="hparams.json is missing"):
        GPT.from_pretrained(folder)


# ======================================================================================== protobuf wire format


@given(st.integers(min_value=0, max_value=2**64 - 1))
def test_varint_round_trip(value):
    encoded = varint(value)
    assert tf_bundle._varint(encoded + b"\xff", 0) == (value, len(encoded))


def test_proto_fields_decode_every_wire_type():
    message = varint(1 << 3) + varint(300)  # field 1, varint
    message += varint(2 << 3 | 1) + struct.pack("<Q", 2**40 + 3)  # field 2, fixed64
    message += varint(3 << 3 | 2) + varint(3) + b"abc"  # field 3, bytes
    message += varint(4 << 3 | 5) + struct.pack("<I", 0xDEADBEEF)  # field 4, fixed32
    message += varint(5 << 3) + varint(-1)  # field 5, a negative int64
    fields = list(tf_bundle._proto_fields(message))
    assert fields[:4] == [(1, 300), (2, 2**40 + 3), (3, b"abc"), (4, 0xDEADBEEF)]
    assert tf_bundle._int64(fields[4][1]) == -1
    with pytest.raises(tf_bundle._Corrupt):
        list(tf_bundle._proto_fields(varint(3 << 3 | 2) + varint(10) + b"short"))


def test_reader_handles_other_dtypes_and_names_unknown_tensors(tmp_path):
    write_bundle(tmp_path / "x", {"a": np.arange(6, dtype=np.float16).reshape(2, 3), "b": np.ones(3, np.int32)})
    reader = TFCheckpointReader(tmp_path / "x")
    assert np.array_equal(reader.read("a"), np.arange(6, dtype=np.float16).reshape(2, 3))
    with pytest.raises(GPT2LabError, match=r"no tensor 'c' in .*x.index"):
        reader.read("c")
