"""The cost model of gpt2lab.analysis against real modules, real caches and hand arithmetic."""

import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from gpt2lab.analysis import format_report, mean_keys_seen, model_report
from gpt2lab.cli.main import main
from gpt2lab.config import GPTConfig
from gpt2lab.errors import GPT2LabError
from gpt2lab.model import GPT
from gpt2lab.train.config import load_model_config, parse_overrides

SMALL = dict(n_layer=2, n_head=4, n_embd=32, vocab_size=100, block_size=64)
VARIANTS = {
    "gpt2": {},
    "rope": dict(pos_encoding="rope"),
    "gqa": dict(n_kv_head=2),
    "mqa": dict(n_kv_head=1),
    "window": dict(window=8),
    "per-layer window": dict(window=[8, None]),
    "everything": dict(pos_encoding="rope", n_kv_head=2, window=[None, 16]),
}


def _part(name: str) -> str:
    if name.startswith("transformer.wte"):
        return "wte"
    if name.startswith("transformer.wpe"):
        return "wpe"
    if ".attn." in name:
        return "attention"
    if ".mlp." in name:
        return "mlp"
    assert ".ln_" in name or name.startswith("transformer.ln_f"), name
    return "layer_norm"


@pytest.mark.parametrize("variant", VARIANTS)
def test_parameter_counts_match_the_model(variant):
    config = GPTConfig(**SMALL, **VARIANTS[variant])
    model = GPT(config)
    measured = dict.fromkeys(["wte", "wpe", "attention", "mlp", "layer_norm"], 0)
    for name, p in model.named_parameters():  # the tied LM head is listed once, as wte
        measured[_part(name)] += p.numel()
    params = model_report(config)["params"]
    assert {k: params[k] for k in measured} == measured
    assert params["total"] == sum(p.numel() for p in model.parameters()) == model.num_params()
    assert params["lm_head"] == 0


@pytest.mark.parametrize("padded", [None, 128], ids=["unpadded", "padded"])
def test_parameter_counts_hold_the_padded_vocabulary(padded):
    """A config padded for training (vocab 100 -> 128 rows) is counted as the model it builds holds: the
    padded rows are parameters in memory; its unpadded config counts the exported model."""
    config = GPTConfig(**SMALL, padded_vocab_size=padded)
    model = GPT(config)
    params = model_report(config)["params"]
    assert params["total"] == sum(p.numel() for p in model.parameters())
    assert params["wte"] == model.transformer.wte.weight.numel() == (padded or 100) * 32
    exported = config.unpadded()
    assert model_report(exported)["params"]["total"] == sum(p.numel() for p in GPT(exported).parameters())
    assert ("padded_vocab_size=128" in format_report(model_report(config))) == (padded is not None)


def test_gpt2_small_has_its_published_parameter_count():
    assert model_report(GPTConfig())["params"]["total"] == 124_439_808


def test_flops_by_hand_on_a_tiny_config():
    # C=8, nh=2, hs=4, V=10, one layer, T=4.
    config = GPTConfig(n_layer=1, n_head=2, n_embd=8, vocab_size=10, block_size=8)
    flops = model_report(config, seq_len=4)["flops_per_token"]
    assert flops["attention_proj"] == 2 * (8 * 24 + 8 * 8)  # c_attn 8->24, c_proj 8->8
    assert flops["attention_scores"] == 2 * 2 * 2 * 4 * 2.5  # QK and AV, 2 heads of 4, (4+1)/2 keys on average
    assert flops["mlp"] == 2 * (8 * 32 + 32 * 8)
    assert flops["lm_head"] == 2 * 8 * 10
    assert flops["total"] == 512 + 80 + 1024 + 160

    # A window of 2 shows 1, 2, 2, 2 keys to the 4 queries; one K/V head shrinks c_attn to 8->16.
    windowed = model_report(config.replace(window=2, n_kv_head=1), seq_len=4)["flops_per_token"]
    assert windowed["attention_scores"] == 2 * 2 * 2 * 4 * (7 / 4)
    assert windowed["attention_proj"] == 2 * (8 * 16 + 8 * 8)


def test_mean_keys_seen():
    assert mean_keys_seen(4, None) == 2.5
    assert mean_keys_seen(4, 8) == 2.5  # a window longer than the sequence changes nothing
    assert mean_keys_seen(1000, 10) == pytest.approx(10 - 45 / 1000)


@pytest.mark.parametrize("variant", ["gpt2", "gqa", "mqa", "padded"])
def test_matmul_flops_match_torch_flop_counter(variant):
    """Projections, MLP and LM head against PyTorch's own counter (it does not count SDPA on CPU). Padded: the
    LM head multiplies by all 128 rows, though its logits are cut to the 100 real ones."""
    padding = {"padded_vocab_size": 128} if variant == "padded" else {}
    config = GPTConfig(**SMALL, **VARIANTS.get(variant, {}), **padding)
    T = 16
    counter = FlopCounterMode(display=False)
    with counter:  # with autograd on: no-grad CPU inference may take oneDNN's linear, which it does not count
        GPT(config)(torch.zeros(1, T, dtype=torch.long))
    counted = sum(n for op, n in counter.get_flop_counts()["Global"].items() if "attention" not in str(op))
    flops = model_report(config, seq_len=T)["flops_per_token"]
    assert counted == T * (flops["attention_proj"] + flops["mlp"] + flops["lm_head"])
    assert flops["lm_head"] == 2 * config.n_embd * (128 if variant == "padded" else 100)


@pytest.mark.parametrize("variant", ["gpt2", "gqa", "mqa", "window", "per-layer window", "everything"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kv_bytes_match_a_filled_cache(variant, dtype):
    config = GPTConfig(**SMALL, **VARIANTS[variant])
    model = GPT(config).to(dtype)
    batch, T = 2, 40
    cache = model.new_cache(batch, T)
    with torch.no_grad():
        model(torch.randint(0, 100, (batch, T - 1)), cache=cache)
        model(torch.randint(0, 100, (batch, 1)), cache=cache)
    assert cache[0].length == T
    kv = model_report(config, seq_len=T, dtype=str(dtype).removeprefix("torch."))["kv_cache"]
    assert sum(layer.nbytes() for layer in cache) == batch * kv["bytes_at_seq_len"]
    assert kv["slots_per_layer"] == [layer.capacity for layer in cache]
    assert kv["bytes_per_token"] == 2 * config.n_layer * config.n_kv_head * config.head_dim * dtype.itemsize


def test_ratios_to_the_gpt2_baseline():
    report = model_report(GPTConfig(**SMALL, n_kv_head=1, window=8), seq_len=64)
    assert report["baseline"]["config"]["n_kv_head"] == 4
    assert report["baseline"]["config"]["window"] is None
    ratio = report["ratio_to_baseline"]
    assert ratio["kv_bytes_per_token"] == 1 / 4
    assert ratio["kv_bytes_at_seq_len"] == pytest.approx(1 / 4 * 8 / 64)
    assert ratio["params"] < 1 and ratio["flops_per_token"] < 1
    assert model_report(GPTConfig(**SMALL))["ratio_to_baseline"] == dict.fromkeys(ratio, 1.0)


def test_bad_inputs_are_one_line_errors():
    with pytest.raises(GPT2LabError, match="longer than the context"):
        model_report(GPTConfig(**SMALL), seq_len=65)
    assert model_report(GPTConfig(**SMALL, pos_encoding="rope"), seq_len=200)["seq_len"] == 200
    with pytest.raises(GPT2LabError, match="dtype"):
        model_report(GPTConfig(**SMALL), dtype="float16")
    with pytest.raises(GPT2LabError, match="key=value"):
        parse_overrides(["n_kv_head"])
    with pytest.raises(GPT2LabError, match="neither a preset"):
        load_model_config("no-such-preset")


def test_overrides_parse_toml_values_else_strings():
    assert parse_overrides(["n_kv_head=4", 'window=[256, "full"]', "pos_encoding=rope", "dropout=0.1"]) == {
        "n_kv_head": 4,
        "window": [256, "full"],
        "pos_encoding": "rope",
        "dropout": 0.1,
    }


def test_config_files(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(GPTConfig(**SMALL, n_kv_head=2).to_dict()))
    assert load_model_config(str(tmp_path)).n_kv_head == 2  # a model folder
    GPT(GPTConfig(**SMALL, window=[8, None])).save_pretrained(tmp_path / "saved")  # config.json with its format
    assert load_model_config(str(tmp_path / "saved")).window == [8, None]
    assert load_model_config(str(tmp_path / "config.json"), {"window": 8}).window == 8
    toml = tmp_path / "train.toml"
    toml.write_text('[model]\npreset = "tiny"\npos_encoding = "rope"\n\n[train]\nsteps = 10\n')
    config = load_model_config(str(toml))
    assert (config.n_layer, config.n_embd, config.pos_encoding) == (2, 64, "rope")


def test_cli_prints_a_table(capsys):
    assert main(["info", "--config", "tiny", "--set", "n_kv_head=1", "--set", 'window=[16, "full"]']) == 0
    out = capsys.readouterr().out
    assert "GPT-2 same size" in out and "KV cache" in out and "0.250x" in out
    assert main(["info", "--config", "gpt2", "--seq-len", "512", "--dtype", "bfloat16", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["params"]["total"] == 124_439_808 and report["kv_cache"]["bytes_per_token"] == 36 * 1024


def test_cli_reports_a_bad_key(capsys):
    assert main(["info", "--set", "n_kv_hed=4"]) == 2
    assert "did you mean 'n_kv_head'" in capsys.readouterr().err
