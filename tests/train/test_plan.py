"""The run plan (gpt2lab plan / train --plan) against figures worked out by hand for a tiny config."""

import json

import pytest

from gpt2lab.cli.main import main
from gpt2lab.errors import GPT2LabError
from gpt2lab.train.config import load_config
from gpt2lab.train.plan import plan
from gpt2lab.train.setup import build_model

# C = 8, L = 2, heads 2, vocab 16 (from the data's meta.json), context 8; global batch 2 x 8 x 2.
TINY = [
    "preset=tiny", "model.n_layer=2", "model.n_head=2", "model.n_embd=8", "model.block_size=8",
    "model.pos_encoding='learned'", "model.window='full'",  # GPT-2's shape, whatever the demo's defaults
    "batch_size=2", "batch.seq_len=8", "grad_accum=2", "max_iters=10", "eval_interval=4", "eval_iters=3",
    "warmup_iters=0", "vocab_multiple=1",  # 16 rows, unpadded: the padded vocabulary has a test of its own
]  # fmt: skip


@pytest.fixture
def tiny(tmp_path):
    (tmp_path / "meta.json").write_text(json.dumps({"vocab_size": 16}))
    return load_config(None, [*TINY, f"data.dir={tmp_path}", f"out_dir={tmp_path / 'run'}"])


def test_tiny_plan_matches_hand_arithmetic(tiny):
    p = plan(tiny, gpus=2, mfu=0.5, gpu_names=["A100"])
    # parameters: wte 16*8, wpe 8*8; per layer c_attn 8*24+24, c_proj 8*8+8, c_fc 8*32+32, c_proj 32*8+8,
    # two LayerNorms 2*16; ln_f 16
    block = (8 * 24 + 24) + (64 + 8) + (8 * 32 + 32) + (32 * 8 + 8) + 32
    root = 128 + 64 + 16
    assert p["params"] == root + 2 * block == 1952
    # forward per token at T = 8: per layer q|k|v + proj 2*(8*24 + 64), scores + values 2*2*8*(8+1)/2,
    # MLP 2*(2*8*32); LM head 2*8*16
    forward = 2 * (2 * (8 * 24 + 64) + 2 * 2 * 8 * 4.5 + 2 * 2 * 8 * 32) + 2 * 8 * 16
    assert forward == 3616
    assert p["flops"]["forward_per_token"] == forward
    assert p["tokens_per_step"] == 32 and p["steps"] == 10 and p["total_tokens"] == 320
    assert p["flops"]["train_run"] == 3 * forward * 320
    # evaluations at steps 0, 4, 8 and 10; each 2 splits x 3 batches x 2 x 8 tokens
    assert p["flops"]["eval_tokens"] == 4 * 2 * 3 * 16
    ddp, fsdp = p["memory_per_gpu"]["ddp"], p["memory_per_gpu"]["fsdp"]
    assert (ddp["parameters"], ddp["gradients"], ddp["optimizer"], ddp["buckets"]) == (7808, 7808, 15616, 7808)
    # bf16 activations: 16 tokens x 2 layers x 34 x 8 bytes + the fp32 embedding sum 16 x 8 x 4
    assert ddp["activations"] == 16 * 2 * 34 * 8 + 16 * 8 * 4
    assert (fsdp["parameters"], fsdp["gradients"], fsdp["optimizer"]) == (3904, 3904, 7808)
    assert fsdp["gathered"] == 4 * (root + 2 * block) + 4 * (root + block)
    assert ddp["total"] == 7808 * 3 + 15616 + 9216
    # wall time: training split over 2 GPUs, evaluation (the same batches on every rank) not
    seconds = 3 * forward * 320 / (2 * 312e12 * 0.5) + forward * 384 / (312e12 * 0.5)
    assert p["hours"]["A100"] == pytest.approx(seconds / 3600)


def test_the_padded_vocabulary_is_counted_as_training_holds_it(tiny):
    """vocab_multiple = 64 pads the 16-token vocabulary to 64 rows of 8: 384 more parameters in the model training
    builds, each with its fp32 weight, gradient, DDP bucket and two AdamW moments, and 48 more rows in the LM
    head's product. The exported model is the unpadded one."""
    unpadded = plan(tiny, gpus=2)
    tiny.vocab_multiple = 64
    padded = plan(tiny, gpus=2)
    rows = (64 - 16) * 8
    assert padded["model"]["padded_vocab_size"] == 64
    assert padded["params"] == sum(p.numel() for p in build_model(tiny, vocab_size=16).parameters())
    assert padded["params"] == unpadded["params"] + rows
    assert padded["exported_params"] == unpadded["exported_params"] == unpadded["params"] == 1952
    assert padded["flops"]["forward_per_token"] == unpadded["flops"]["forward_per_token"] + 2 * rows

    def grown(strategy: str) -> dict[str, float]:
        before, after = unpadded["memory_per_gpu"][strategy], padded["memory_per_gpu"][strategy]
        return {part: after[part] - before[part] for part in after}

    # bytes per padded parameter: fp32 weight, gradient and DDP bucket, AdamW's two fp32 moments
    ddp = {"parameters": 4, "gradients": 4, "optimizer": 8, "buckets": 4, "activations": 0, "total": 20}
    assert grown("ddp") == {part: n * rows for part, n in ddp.items()}
    # FSDP2: sharded over the 2 GPUs, and wte gathered whole with the root unit (its weights and its gradients)
    fsdp = {"parameters": 2, "gradients": 2, "optimizer": 4, "gathered": 4 + 4, "activations": 0, "total": 16}
    assert grown("fsdp") == {part: n * rows for part, n in fsdp.items()}


def test_fp32_uses_tf32_peak_and_doubles_activations(tiny):
    bf16 = plan(tiny)
    tiny.dtype = "float32"
    fp32 = plan(tiny)
    assert fp32["hours"]["H100"] == pytest.approx(2 * bf16["hours"]["H100"])
    assert fp32["memory_per_gpu"]["ddp"]["buckets"] == 0  # one process: no DDP
    extra = 16 * 2 * 34 * 8
    assert fp32["memory_per_gpu"]["ddp"]["activations"] == bf16["memory_per_gpu"]["ddp"]["activations"] + extra


def test_bad_plan_inputs_are_one_line(tiny):
    with pytest.raises(GPT2LabError, match="multiple of the number of GPUs"):
        plan(tiny, gpus=3)
    with pytest.raises(GPT2LabError, match="unknown GPU 'V100'"):
        plan(tiny, gpu_names=["V100"])


def test_train_plan_trains_nothing(tiny, tmp_path, capsys):
    args = ["--set", f"data.dir={tmp_path}", "--set", f"out_dir={tmp_path / 'run'}"]
    args += [a for item in TINY for a in ("--set", item)]
    assert main(["train", "--plan", "--gpus", "2", "--gpu", "H200", "--mfu", "0.5", *args]) == 0
    out = capsys.readouterr().out
    assert "1,952 parameters" in out and "tokens per step      32" in out and "H200" in out and "A100" not in out
    assert not (tmp_path / "run").exists()
    assert main(["plan", "--json", *args]) == 0
    assert json.loads(capsys.readouterr().out)["total_tokens"] == 320
    assert main(["plan", "--gpus", "3", *args]) == 2
    assert "multiple of the number of GPUs" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["fineweb-edu-124m", "openwebtext-124m"])
def test_recipes_load_and_plan(name):
    from pathlib import Path

    cfg = load_config(Path(__file__).resolve().parents[2] / "configs" / f"{name}.toml")
    p = plan(cfg, gpus=8)
    assert p["exported_params"] == 124_439_808 and p["total_tokens"] == 524_288 * 19_073
    assert p["params"] == 124_439_808 + (50_304 - 50_257) * 768  # trained with GPT-2's vocabulary padded, as nanoGPT
    assert cfg.reference["source"] and cfg.reference_at(p["total_tokens"]) is not None
    assert cfg.hellaswag_interval > 0
