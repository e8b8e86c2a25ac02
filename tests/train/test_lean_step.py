"""The lean training step (issue 24, item 3): no read of the device between log steps; divergence still
stops the run before any non-finite weights are saved; a skipped step leaves model and optimizer as they
were; exact resume with batches drawn ahead; step times that hold without per-step reads; MFU's peak
named; TF32 set through one API."""

from __future__ import annotations

import copy
import functools
import signal
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as torch_dist
from training_helpers import logged_losses, tiny_args, tiny_config

from gpt2lab.checkpoints.train_state import load_checkpoint
from gpt2lab.cli.main import main
from gpt2lab.data.loader import BatchLoader
from gpt2lab.errors import GPT2LabError
from gpt2lab.kernels.precision import set_tf32
from gpt2lab.train import distributed, loop
from gpt2lab.train.config import load_config, load_model_config
from gpt2lab.train.distributed import Dist
from gpt2lab.train.loop import Trainer, train
from gpt2lab.train.plan import train_flops_per_token
from gpt2lab.train.run import read_metrics

ONE_CPU = Dist(rank=0, world=1, device=torch.device("cpu"))
# Every way Python code reads a tensor's value on the host (on CUDA: waits for the device).
READS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__")


def make_trainer(corpus, out, *overrides: str) -> Trainer:
    return Trainer(tiny_config(corpus, out, *overrides), ONE_CPU)


def nan_at(trainer: Trainer, bad_step: int) -> None:
    """Step ``bad_step``'s training loss (and so its gradients) becomes NaN; evaluations are untouched."""

    def hook(module, args, output):
        if module.model.training and trainer.step == bad_step - 1:
            return output * float("nan")
        return None

    trainer.loss.register_forward_hook(hook)


@pytest.fixture
def drawn_ahead(monkeypatch):
    """The trainer's loader gathers on a thread one step ahead, as on CUDA (on a CPU it gathers inline)."""
    monkeypatch.setattr(loop, "BatchLoader", functools.partial(BatchLoader, background=True))


# ---------------------------------------------------------------------------------------- host reads


@pytest.mark.parametrize("group", ["auto", "always"], ids=["alone", "group"])
def test_no_value_is_read_from_the_device_between_log_steps(corpus, tmp_path, monkeypatch, drawn_ahead, group):
    """In a process group (of one, gloo) too, where the stop agreement adds a read after step 10 alone."""
    main, where, reads = threading.get_ident(), {"step": 0, "in_step": False}, []

    def counting(name, read):
        def counted(self, *args, **kwargs):
            if threading.get_ident() == main:  # the loader's thread reads its CPU offsets, never the device
                reads.append((where["step"], where["in_step"], name))
            return read(self, *args, **kwargs)

        return counted

    for name in READS:
        monkeypatch.setattr(torch.Tensor, name, counting(name, getattr(torch.Tensor, name)))
    step = Trainer.train_step

    def watched(self):
        where["in_step"] = True
        try:
            return step(self)
        finally:
            where.update(step=self.step, in_step=False)

    monkeypatch.setattr(Trainer, "train_step", watched)
    settings = ("max_iters=12", "log_interval=4", "eval_interval=6", "ckpt_interval=6", f"process_group='{group}'")
    train(tiny_config(corpus, tmp_path / "run", *settings))
    assert [r for r in reads if r[1]] == []  # none inside a step
    # after a step: only log steps (4, 8, 12), evaluations and checkpoints (6, 12) read the device
    assert {s for s, _, _ in reads if s > 0} == {4, 6, 8, 12} | ({10} if group == "always" else set())
    assert reads  # the counting saw the reads that do happen


# ---------------------------------------------------------------------------------------- stopping on a signal


@pytest.fixture
def stop_checks(monkeypatch):
    """The step after which each stop agreement ran (its all-reduce takes the MAX, the only one that does on the
    lean path), and ``where["signal_at"]``: the step after which the test raises SIGTERM in the process."""
    where, checks = {"step": 0, "signal_at": None}, []
    step, all_reduce = Trainer.train_step, distributed.torch_dist.all_reduce

    def stepped(self):
        loss = step(self)
        where["step"] = self.step
        if self.step == where["signal_at"]:
            signal.raise_signal(signal.SIGTERM)  # the trainer's own handler catches it
        return loss

    def counted(tensor, op=torch_dist.ReduceOp.SUM, **kwargs):
        if op == torch_dist.ReduceOp.MAX:
            checks.append(where["step"])
        return all_reduce(tensor, op=op, **kwargs)

    monkeypatch.setattr(Trainer, "train_step", stepped)
    monkeypatch.setattr(distributed.torch_dist, "all_reduce", counted)
    return where, checks


def test_a_process_group_agrees_on_stopping_at_log_steps_and_every_tenth_step(corpus, tmp_path, stop_checks):
    """25 steps logged every 7th in a group of one (gloo): the stop agreement, a collective and a host read, runs
    after steps 7, 10, 14, 20, 21 and 25 (the last is a log step) and no other: 6 collectives, not 25."""
    _, checks = stop_checks
    settings = ("max_iters=25", "log_interval=7", "process_group='always'")
    assert train(tiny_config(corpus, tmp_path / "run", *settings))["step"] == 25
    assert checks == [7, 10, 14, 20, 21, 25]


@pytest.mark.parametrize(("group", "stops_at"), [("always", 10), ("auto", 3)], ids=["group", "alone"])
def test_a_signal_mid_run_stops_at_a_saved_checkpoint(corpus, tmp_path, stop_checks, group, stops_at):
    """SIGTERM after step 3, nothing logged or saved before step 1000: a group of one stops after step 10, the
    first step its ranks agree at; a process alone stops after step 3, with no collective. Either way the run
    ends with a checkpoint of the step it stopped at, and exports that model."""
    where, checks = stop_checks
    where["signal_at"] = 3
    out = tmp_path / "run"
    settings = ("max_iters=30", "log_interval=1000", "eval_interval=1000", f"process_group='{group}'")
    summary = train(tiny_config(corpus, out, *settings))
    assert (summary["stopped"], summary["signal"], summary["step"]) == (True, signal.SIGTERM, stops_at)
    assert load_checkpoint(out / "ckpt.pt")["step"] == stops_at
    assert (out / "model.safetensors").is_file()
    assert checks == ([10] if group == "always" else [])


def test_a_rank_stopped_by_another_ranks_signal_exits_with_that_signal(corpus, tmp_path, monkeypatch, capsys):
    """The agreement's all-reduce answers as if another rank had caught SIGINT: this rank, which caught nothing,
    stops at the next agreement (step 10) with the checkpoint of that step and SIGINT's exit status, 130."""
    all_reduce = distributed.torch_dist.all_reduce

    def another_rank_caught_sigint(tensor, op=torch_dist.ReduceOp.SUM, **kwargs):
        work = all_reduce(tensor, op=op, **kwargs)
        if op == torch_dist.ReduceOp.MAX:
            tensor.clamp_(min=float(signal.SIGINT))
        return work

    monkeypatch.setattr(distributed.torch_dist, "all_reduce", another_rank_caught_sigint)
    out = tmp_path / "run"
    settings = ("max_iters=30", "log_interval=1000", "eval_interval=1000", "process_group='always'")
    assert main(["train", *tiny_args(corpus, out, *settings)]) == 128 + signal.SIGINT
    assert load_checkpoint(out / "ckpt.pt")["step"] == 10
    assert "stopped at step 10" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------- divergence


def test_divergence_is_found_at_the_next_read_and_never_saved(corpus, tmp_path):
    out = tmp_path / "run"
    trainer = make_trainer(corpus, out, "max_iters=20", "log_interval=4", "ckpt_interval=3")
    assert trainer.guard.lean  # float32 with the fused AdamW: the lean path
    nan_at(trainer, 5)
    message = r"^training diverged at step 5: loss nan, gradient norm nan; .*the last checkpoint \(step 3\) is intact"
    with pytest.raises(GPT2LabError, match=message):
        trainer.run()
    assert trainer.step == 6  # found before step 6's checkpoint, the first read after step 5
    ckpt = load_checkpoint(out / "ckpt.pt")
    assert ckpt["step"] == 3 and all(torch.isfinite(t).all() for t in ckpt["model"].values())
    assert not (out / "model.safetensors").exists()
    assert max(r["step"] for r in read_metrics(out)) == 4
    # the bad step's update was skipped on the device: nothing non-finite even in memory
    assert all(torch.isfinite(p).all() for p in trainer.wrapped.parameters())
    states = trainer.optimizer.state.values()
    assert all(torch.isfinite(t).all() for s in states for t in s.values())


@pytest.mark.parametrize("lean", [True, False], ids=["lean", "host"])
def test_a_skipped_step_leaves_model_and_optimizer_as_they_were(corpus, tmp_path, lean):
    trainer = make_trainer(corpus, tmp_path / "run", "max_iters=7", "skip_nonfinite=true", "log_interval=3")
    trainer.guard.lean = lean  # False: the path of float16 and of optimizers without the fused kernel
    nan_at(trainer, 5)
    snapshots, step = {}, trainer.train_step

    def recorded():
        loss = step()
        model = {k: v.clone() for k, v in trainer.wrapped.state_dict().items()}
        snapshots[trainer.step] = model, copy.deepcopy(trainer.optimizer.state_dict()["state"])
        return loss

    trainer.train_step = recorded
    assert trainer.run()["step"] == 7
    (model4, optim4), (model5, optim5), (model6, _) = snapshots[4], snapshots[5], snapshots[6]
    assert all(torch.equal(model4[k], model5[k]) for k in model4)
    assert all(torch.equal(optim4[i][k], optim5[i][k]) for i in optim4 for k in optim4[i])  # step counts too
    assert not torch.equal(model5["lm_head.weight"], model6["lm_head.weight"])  # then it trains on
    rows = [r for r in read_metrics(tmp_path / "run") if "loss" in r]
    assert [(r["step"], r.get("skipped_steps", 0)) for r in rows] == [(3, 0), (6, 1), (7, 1)]
    assert load_checkpoint(tmp_path / "run" / "ckpt.pt")["skipped"] == 1


def test_the_lean_and_host_paths_train_identically(corpus, tmp_path):
    losses = []
    for lean in (True, False):
        trainer = make_trainer(corpus, tmp_path / str(lean), "max_iters=5")
        trainer.guard.lean = lean
        losses.append(trainer.run()["losses"])
    assert losses[0] == losses[1]


# ---------------------------------------------------------------------------------------- resume


def test_resume_is_exact_with_batches_drawn_ahead(corpus, tmp_path, drawn_ahead):
    """The loader has drawn step 4's batch when step 3's checkpoint is written; the resumed run must
    still draw exactly that batch next."""
    straight = train(tiny_config(corpus, tmp_path / "a", "max_iters=6"))
    train(tiny_config(corpus, tmp_path / "b", "max_iters=3"))
    resumed = train(tiny_config(corpus, tmp_path / "b", "max_iters=6"), resume=True)
    assert resumed["losses"] == straight["losses"][3:]
    assert logged_losses(tmp_path / "b") == logged_losses(tmp_path / "a")


# ---------------------------------------------------------------------------------------- what is logged


def test_step_time_is_measured_between_reads_and_leaves_evaluation_out(corpus, tmp_path, monkeypatch):
    """A fake clock: each step takes 0.5 s, each evaluation 10 s, each checkpoint 3 s. Logged every 2 steps,
    evaluated and saved every 3: every logged dt is 0.5 s."""
    clock = {"now": 0.0}
    monkeypatch.setattr(loop, "time", SimpleNamespace(perf_counter=lambda: clock["now"]))

    def taking(seconds, run):
        def timed(self):
            clock["now"] += seconds  # the time passes while the call runs, before what it does at its end
            return run(self)

        return timed

    for name, seconds in (("train_step", 0.5), ("evaluate", 10.0), ("checkpoint", 3.0)):
        monkeypatch.setattr(Trainer, name, taking(seconds, getattr(Trainer, name)))
    out = tmp_path / "run"
    train(tiny_config(corpus, out, "max_iters=8", "log_interval=2", "eval_interval=3", "ckpt_interval=3"))
    rows = [r for r in read_metrics(out) if "loss" in r]
    assert [r["step"] for r in rows] == [2, 4, 6, 8]
    assert [r["dt"] for r in rows] == [0.5] * 4
    assert [r["tokens_per_s"] for r in rows] == [2 * 2 * 16 / 0.5] * 4  # grad_accum x batch_size x seq_len
    assert not any("mfu" in r for r in rows)  # a CPU has no listed peak


def test_mfu_names_the_peak_it_divides_by(corpus, tmp_path, monkeypatch):
    """A CPU that claims an H100's bf16 peak: every MFU row names the device, dtype and peak it divides by
    (on CUDA the name is torch.cuda.get_device_name's, e.g. "NVIDIA H100 80GB HBM3")."""
    monkeypatch.setattr(loop, "peak_flops", lambda device, dtype: 989e12)
    out = tmp_path / "run"
    cfg = tiny_config(corpus, out, "max_iters=3")
    train(cfg)
    trained = load_model_config(str(out)).replace(padded_vocab_size=50_304)  # config.json holds the export
    flops_per_token = train_flops_per_token(cfg, trained)
    rows = [r for r in read_metrics(out) if "loss" in r]
    assert len(rows) == 3
    for row in rows:
        assert row["mfu_peak"] == "cpu float32 989 TFLOP/s x 1"
        assert row["mfu"] == pytest.approx(flops_per_token * row["tokens_per_s"] / 989e12)


# ---------------------------------------------------------------------------------------- TF32


@pytest.fixture
def matmul_precision():
    before = torch.backends.cuda.matmul.allow_tf32
    yield
    torch.backends.cuda.matmul.allow_tf32 = before


def test_tf32_is_set_so_that_every_reader_agrees(matmul_precision):
    """Inductor and Dynamo read the precision through both APIs (the per-backend ``fp32_precision``, and the
    global ``get_float32_matmul_precision`` / cuBLAS flag); torch refuses a read when the two disagree, as
    they do after a write through ``fp32_precision`` alone (checked first, so the test sees the failure)."""
    torch.backends.cuda.matmul.fp32_precision = "tf32"
    with pytest.raises(RuntimeError, match="mix of the legacy and new APIs"):
        torch.get_float32_matmul_precision()
    for enabled, mode, legacy in ((True, "tf32", "high"), (False, "ieee", "highest")):
        set_tf32(enabled)
        assert torch.backends.cuda.matmul.fp32_precision == mode
        assert torch.get_float32_matmul_precision() == legacy
        assert torch.backends.cuda.matmul.allow_tf32 is enabled


# ---------------------------------------------------------------------------------------- CUDA


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda_no_step_synchronises_with_the_host(corpus, tmp_path, monkeypatch):
    step = Trainer.train_step

    def strict(self):
        if self.step == 0:  # the first step creates the optimizer state and warms the allocators
            return step(self)
        torch.cuda.set_sync_debug_mode("error")  # any synchronising call raises
        try:
            return step(self)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    monkeypatch.setattr(Trainer, "train_step", strict)
    out = tmp_path / "run"
    train(tiny_config(corpus, out, "device='cuda'", "max_iters=6", "log_interval=3"))
    assert [r["step"] for r in read_metrics(out) if "loss" in r] == [3, 6]


# ---------------------------------------------------------------------------------------- nanoGPT's recipe


def test_the_nanogpt_config_spells_nanogpts_cpu_recipe():
    """configs/nanogpt-shakespeare-char-cpu.toml against nanoGPT's README command line on top of its
    config/train_shakespeare_char.py and train.py defaults, as benchmarks/nanogpt_cpu.py compares them."""
    cfg = load_config(Path(__file__).resolve().parents[2] / "configs" / "nanogpt-shakespeare-char-cpu.toml")
    model = {"n_layer": 4, "n_head": 4, "n_embd": 128, "block_size": 64, "dropout": 0.0}
    model |= {"pos_encoding": "learned", "window": "full", "activation": "gelu"}  # wpe, full SDPA, nn.GELU()
    assert cfg.model == model
    optim = (cfg.lr, cfg.min_lr, cfg.warmup_iters, cfg.max_iters, cfg.lr_decay_iters, cfg.weight_decay, cfg.betas)
    assert optim == (1e-3, 1e-4, 100, 2000, 2000, 0.1, [0.9, 0.99]) and cfg.grad_clip == 1.0
    assert (cfg.batch_size, cfg.seq_len, cfg.grad_accum) == (12, 64, 1)
    assert (cfg.eval_interval, cfg.eval_iters, cfg.log_interval, cfg.seed) == (250, 20, 1, 1337)
    assert (cfg.dtype, cfg.compile, cfg.device) == ("float32", False, "cpu")
