"""A process group of one (``[run] process_group = "always"``; gloo on CPU, NCCL on CUDA): DDP and FSDP2
wrap the model in a single process and give a bare process's losses, FSDP2 in bf16 gathers bf16
parameters and reduces in fp32, its checkpoints resume in a bare process, and the group is gone after
every run, a failed one included."""

from __future__ import annotations

import tempfile
import warnings

import pytest
import torch
import torch.distributed as torch_dist
import torch.distributed.fsdp as fsdp
from torch.distributed.fsdp import FSDPModule
from torch.nn.parallel import DistributedDataParallel
from training_helpers import logged_losses, tiny_config

import gpt2lab.train.loop as loop
from gpt2lab.checkpoints.train_state import load_checkpoint
from gpt2lab.cli.main import main
from gpt2lab.errors import GPT2LabError
from gpt2lab.model import Block
from gpt2lab.train.config import load_config
from gpt2lab.train.loop import train

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
BF16 = "dtype='bfloat16'"


def _train(corpus, out, *overrides, **options) -> dict:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "bfloat16 autocast on this cpu")  # a CPU without native bf16
        return train(tiny_config(corpus, out, *overrides), **options)


def _close(a: dict[int, float], b: dict[int, float], steps, tol: float) -> None:
    assert [a[s] for s in steps] == pytest.approx([b[s] for s in steps], abs=tol)


@pytest.fixture
def wrapped(monkeypatch):
    """What each run's ``wrap_model`` returned, the dtype of a block's weight whenever the block ran, and
    the mixed-precision policies ``fully_shard`` was given."""
    seen = {"runs": [], "weight_dtypes": set(), "policies": []}
    wrap, shard = loop.wrap_model, fsdp.fully_shard

    def spy_wrap(model, *args, **kwargs):
        result = wrap(model, *args, **kwargs)
        seen["runs"].append(result)
        record = seen["weight_dtypes"].add
        model.transformer.h[0].mlp.c_fc.register_forward_pre_hook(lambda module, _: record(module.weight.dtype))
        return result

    def spy_shard(module, **kwargs):
        seen["policies"].append(kwargs.get("mp_policy"))
        return shard(module, **kwargs)

    monkeypatch.setattr(loop, "wrap_model", spy_wrap)
    monkeypatch.setattr(fsdp, "fully_shard", spy_shard)  # distributed.py imports it when it shards
    return seen


@pytest.fixture(autouse=True)
def _no_group_left():
    """Every test starts and ends outside a process group: a run must leave none behind."""
    assert not torch_dist.is_initialized()
    yield
    assert not torch_dist.is_initialized()


@pytest.fixture(scope="module")
def bare(corpus, tmp_path_factory):
    """Six steps in a plain process (no group), fp32."""
    out = tmp_path_factory.mktemp("bare")
    _train(corpus, out, "max_iters=6")
    return logged_losses(out)


@pytest.fixture(scope="module")
def bare_bf16(corpus, tmp_path_factory):
    """Four steps in a plain process under bf16 autocast (fp32 parameters)."""
    out = tmp_path_factory.mktemp("bare-bf16")
    _train(corpus, out, "max_iters=4", BF16)
    return logged_losses(out)


def _check_wrapped(run: tuple, strategy: str) -> None:
    model, loss, _ = run
    if strategy == "ddp":
        assert isinstance(loss, DistributedDataParallel) and not isinstance(model, FSDPModule)
    else:
        assert isinstance(model, FSDPModule) and all(isinstance(block, FSDPModule) for block in model.transformer.h)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_one_process_group_trains_as_a_bare_process(corpus, bare, tmp_path, wrapped, strategy):
    """fp32: a gradient reduced over one rank is itself, so the wrapped run's losses are the bare run's."""
    _train(corpus, tmp_path, "max_iters=6", f"strategy={strategy}", "process_group=always")
    assert len(wrapped["runs"]) == 1
    _check_wrapped(wrapped["runs"][0], strategy)
    assert wrapped["weight_dtypes"] == {torch.float32}
    _close(logged_losses(tmp_path), bare, range(1, 7), 1e-6)


def test_fsdp_bf16_gathers_bf16_parameters_and_reduces_in_fp32(corpus, bare_bf16, tmp_path, wrapped):
    """FSDP2's bf16 policy against bf16 autocast over fp32 parameters: the matrix products are bf16 in
    both, but FSDP2 also keeps the embeddings, the residual stream and the gradients in bf16, so the
    losses agree only to bf16 rounding."""
    _train(corpus, tmp_path, "max_iters=4", "strategy=fsdp", "process_group=always", BF16)
    _check_wrapped(wrapped["runs"][0], "fsdp")
    assert wrapped["weight_dtypes"] == {torch.bfloat16}  # gathered for forward in bf16
    expected = fsdp.MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    assert wrapped["policies"] == [expected] * 2  # the block, then the root
    # the fp32 shards are what AdamW updates and what the checkpoint holds
    assert {t.dtype for t in load_checkpoint(tmp_path / "ckpt.pt")["model"].values()} == {torch.float32}
    _close(logged_losses(tmp_path), bare_bf16, range(1, 5), 5e-3)


def test_one_process_fsdp_checkpoint_resumes_in_a_bare_process(corpus, bare, tmp_path):
    """Written by FSDP2 in a group of one (full state dicts), continued in a plain process: the losses of
    a run that never stopped. The second run in this process also shows the first left no group."""
    out = tmp_path / "run"
    _train(corpus, out, "max_iters=3", "strategy=fsdp", "process_group=always")
    _train(corpus, out, "max_iters=6", resume=True)
    _close(logged_losses(out), bare, range(1, 7), 1e-6)


def test_the_group_is_torn_down_after_each_run(corpus, tmp_path, monkeypatch, wrapped):
    """Two grouped runs in one process each form and leave their own group and remove its store; so does
    a run that fails after the group was formed."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    for i, strategy in enumerate(("fsdp", "ddp")):
        _train(corpus, tmp_path / f"run{i}", "max_iters=2", f"strategy={strategy}", "process_group=always")
        assert not torch_dist.is_initialized() and not any((tmp_path / "tmp").iterdir())
    assert len(wrapped["runs"]) == 2
    groups = []
    setup = loop.setup
    monkeypatch.setattr(loop, "setup", lambda *args: groups.append(setup(*args)) or groups[-1])
    with pytest.raises(GPT2LabError, match="seq_len"):  # refused by the Trainer, inside the group
        _train(corpus, tmp_path / "bad", "max_iters=2", "process_group=always", "seq_len=64")
    assert [dist.grouped for dist in groups] == [True] and not any((tmp_path / "tmp").iterdir())


def test_a_group_formed_elsewhere_is_refused(corpus, tmp_path):
    torch_dist.init_process_group("gloo", store=torch_dist.HashStore(), rank=0, world_size=1)
    try:
        with pytest.raises(GPT2LabError, match="a process group already exists in this process"):
            _train(corpus, tmp_path, "max_iters=1", "process_group=always")
    finally:
        torch_dist.destroy_process_group()


@pytest.mark.slow
def test_fsdp_compiles_each_block_on_its_own(corpus, bare, tmp_path, monkeypatch):
    """``compile = true`` under FSDP2: every block is compiled in place (names and checkpoints unchanged),
    the loss module is not compiled as a whole; the losses are eager's to compiler rounding."""
    compiled, whole = [], []
    module_compile, torch_compile = torch.nn.Module.compile, torch.compile

    def spy_module_compile(module, *args, **kwargs):
        compiled.append(type(module))
        return module_compile(module, *args, **kwargs)

    def spy_compile(fn, *args, **kwargs):
        whole.extend([fn] if isinstance(fn, torch.nn.Module) else [])
        return torch_compile(fn, *args, **kwargs)

    monkeypatch.setattr(torch.nn.Module, "compile", spy_module_compile)
    monkeypatch.setattr(torch, "compile", spy_compile)
    out = tmp_path / "run"
    _train(corpus, out, "max_iters=3", "strategy=fsdp", "process_group=always", "compile=true", "n_layer=2")
    assert len(compiled) == 2 and all(issubclass(kind, Block) for kind in compiled) and whole == []
    eager = tmp_path / "eager"
    _train(corpus, eager, "max_iters=3", "n_layer=2")
    _close(logged_losses(out), logged_losses(eager), range(1, 4), 1e-4)


def test_process_group_setting_and_its_refusal(tmp_path, capsys):
    assert load_config(None, []).process_group == "auto"
    assert load_config(None, ["run.process_group=always"]).process_group == "always"
    with pytest.raises(GPT2LabError, match="config: process_group must be one of auto, always, got 'sometimes'"):
        load_config(None, ["run.process_group=sometimes"])
    assert main(["train", "--set", "run.process_group=sometimes", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "process_group must be one of auto, always" in err


@needs_cuda
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_one_process_nccl_group_on_cuda(corpus, tmp_path, wrapped, strategy):
    """The same on a GPU, NCCL: fp32 equal to a bare CUDA run; bf16 FSDP2 to bf16 rounding."""
    cuda = "device=cuda"
    _train(corpus, tmp_path / "bare", "max_iters=4", cuda)
    _train(corpus, tmp_path / "group", "max_iters=4", cuda, f"strategy={strategy}", "process_group=always")
    _check_wrapped(wrapped["runs"][-1], strategy)
    assert next(wrapped["runs"][-1][0].parameters()).device.type == "cuda"
    _close(logged_losses(tmp_path / "group"), logged_losses(tmp_path / "bare"), range(1, 5), 1e-4)
    if strategy == "fsdp":
        _train(corpus, tmp_path / "bare-bf16", "max_iters=4", cuda, BF16)
        _train(corpus, tmp_path / "fsdp-bf16", "max_iters=4", cuda, BF16, "strategy=fsdp", "process_group=always")
        _close(logged_losses(tmp_path / "fsdp-bf16"), logged_losses(tmp_path / "bare-bf16"), range(1, 5), 2e-2)
