"""The training loss's paths (gpt2lab.kernels.lm_head_loss): the full logits through F.cross_entropy, and the
chunked loss at several chunk sizes, one of them smaller than the rows. Each gives the loss and the gradients
of hidden and weight of a plain ``F.cross_entropy(hidden @ W.T, targets, ignore_index=-1)`` computed by
autograd, with ignored targets, with a padded vocabulary (whose rows are in no softmax: zero gradient) and
under bf16 autocast; the full path compiles as one graph; the choice between paths is measured once per
shape, or pinned, where the device chooses (CUDA; the CPU keeps the chunked path)."""

import pytest
import torch
import torch.nn.functional as F

import gpt2lab.kernels.choice as kernel_choice
import gpt2lab.kernels.lm_head_loss as loss_module
from gpt2lab import GPT, GPTConfig
from gpt2lab.kernels.lm_head_loss import LOSS_PATHS, LanguageModelLoss, LMHeadLoss, full_loss, lm_head_loss

N, C, V, VP = 37, 16, 50, 64  # rows, width, real vocabulary, padded vocabulary


def _chunked(rows: int):
    return lambda h, w, t, v: LMHeadLoss.apply(h, w, t, v, 4 * w.shape[0] * rows)


PATHS = {
    "full": full_loss,
    "chunked, 7 rows a chunk": _chunked(7),
    "chunked, 16 rows a chunk": _chunked(16),
    "chunked, one chunk": _chunked(N),
    "loss_chunked_256mib": LOSS_PATHS["loss_chunked_256mib"],
}


def _inputs(rows: int, seed: int = 0, n: int = N, width: int = C, device: str = "cpu"):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, width, generator=g)
    weight = 0.5 * torch.randn(rows, width, generator=g)
    targets = torch.randint(0, V, (n,), generator=g)
    targets[3:9] = -1  # ignored
    targets[-1] = -1
    return hidden.to(device), weight.to(device), targets.to(device)


def _reference(hidden, weight, targets):
    """Loss and gradients of F.cross_entropy over the real rows' logits, by autograd, in float32."""
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss = F.cross_entropy(h @ w[:V].T, targets, ignore_index=-1)
    loss.backward()
    return loss.detach(), h.grad, w.grad  # w.grad is zero on padded rows: they are in no product here


def _run(path, hidden, weight, targets, bf16: bool = False):
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    with torch.autocast(hidden.device.type, dtype=torch.bfloat16, enabled=bf16):
        loss = path(h, w, targets, V)
    loss.backward()
    return loss.detach(), h.grad, w.grad


def _assert_close(got, want, loose: bool = False):
    for name, a, b in zip(("loss", "grad hidden", "grad weight"), got, want, strict=True):
        atol = 2e-2 * b.abs().max().item() if loose else 1e-6
        torch.testing.assert_close(a.float(), b, rtol=0 if loose else 1e-5, atol=atol, msg=name)


@pytest.mark.parametrize("rows", [V, VP], ids=["unpadded", "padded"])
@pytest.mark.parametrize("path", PATHS)
def test_every_path_gives_the_plain_cross_entropy_and_its_gradients(path, rows):
    hidden, weight, targets = _inputs(rows)
    got, want = _run(PATHS[path], hidden, weight, targets), _reference(hidden, weight, targets)
    _assert_close(got, want)
    assert not got[2][V:].any()  # padded rows: exactly zero gradient
    with torch.no_grad():
        assert PATHS[path](hidden, weight, torch.full_like(targets, -1), V).isnan()  # no target: nan, as F does


@pytest.mark.parametrize("path", PATHS)
def test_every_path_under_bf16_autocast_follows_the_float32_reference(path):
    hidden, weight, targets = _inputs(VP, seed=1)
    got = _run(PATHS[path], hidden, weight, targets, bf16=True)
    _assert_close(got, _reference(hidden, weight, targets), loose=True)
    assert not got[2][V:].any()


def test_the_full_path_compiles_into_one_graph():
    """What a compiled training step traces on CUDA: no graph break, forward and backward equal to the reference."""
    torch._dynamo.reset()
    hidden, weight, targets = _inputs(VP, seed=2)
    explained = torch._dynamo.explain(full_loss)(hidden, weight, targets, V)
    assert explained.graph_count == 1 and explained.graph_break_count == 0
    compiled = torch.compile(full_loss, fullgraph=True)
    _assert_close(_run(compiled, hidden, weight, targets), _reference(hidden, weight, targets))


def test_a_compiled_training_loss_is_one_graph_of_the_full_path(monkeypatch):
    """The trainer compiles LanguageModelLoss; on every device (the CPU included, which eagerly takes the chunked
    path) the loss inside the trace is the full path, with no graph break around it and the reference's loss
    and gradients."""
    monkeypatch.setattr(loss_module, "LMHeadLoss", _NoChunks)
    torch._dynamo.reset()
    hidden, weight, targets = _inputs(VP, seed=3)
    compiled = torch.compile(lm_head_loss, fullgraph=True)
    _assert_close(_run(compiled, hidden, weight, targets), _reference(hidden, weight, targets))
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset("tiny", vocab_size=V, padded_vocab_size=VP, pos_encoding="learned"))
    idx, y = torch.randint(0, V, (2, 9)), torch.randint(0, V, (2, 9))
    loss = torch.compile(LanguageModelLoss(model), fullgraph=True)(idx, y)
    torch.testing.assert_close(loss, model.loss(idx, y), rtol=0, atol=1e-5)


class _NoChunks:
    @staticmethod
    def apply(*args):
        raise AssertionError("the chunked loss ran where the full path was expected")


def _counted(fn):
    def counted(*args):
        counted.calls += 1
        return fn(*args)

    counted.calls = 0
    return counted


def _decisions():
    return [d for d in kernel_choice.decisions() if d.operation == "lm head loss"]


def test_the_cpu_keeps_the_chunked_path_without_measuring(fresh_kernel_choices, monkeypatch):
    monkeypatch.setattr(loss_module, "full_loss", _counted(full_loss))
    hidden, weight, targets = _inputs(VP, seed=4)
    _assert_close(_run(lm_head_loss, hidden, weight, targets), _reference(hidden, weight, targets))
    assert _decisions() == [] and loss_module.full_loss.calls == 0


@pytest.mark.parametrize("pin", list(LOSS_PATHS))
def test_a_pinned_path_is_used_without_measuring(pin, fresh_kernel_choices, monkeypatch):
    monkeypatch.setattr(loss_module, "CHOOSING_DEVICES", ("cpu", "cuda"))
    monkeypatch.setenv(kernel_choice.ENV, pin)
    hidden, weight, targets = _inputs(VP, seed=5)
    _assert_close(_run(lm_head_loss, hidden, weight, targets), _reference(hidden, weight, targets))
    _assert_close(_run(lm_head_loss, hidden, weight, targets), _reference(hidden, weight, targets))  # cached
    (decision,) = _decisions()
    assert (decision.picked, decision.how, decision.times) == (pin, "pinned", {})


def test_the_choice_is_measured_once_per_shape_and_grad_mode(fresh_kernel_choices, monkeypatch):
    """Unpinned, every path is timed (forward + backward when a gradient is wanted), the fastest kept; calls
    of the same shape reuse it, forward-only calls (evaluation) are measured apart. Whichever path wins, the
    loss is the reference's."""
    monkeypatch.setattr(loss_module, "CHOOSING_DEVICES", ("cpu", "cuda"))
    torch._dynamo.reset()
    hidden, weight, targets = _inputs(VP, seed=6)
    for _ in range(2):
        _assert_close(_run(lm_head_loss, hidden, weight, targets), _reference(hidden, weight, targets))
    want = _reference(hidden, weight, targets)[0]
    with torch.no_grad():
        torch.testing.assert_close(lm_head_loss(hidden, weight, targets, V), want, rtol=1e-5, atol=1e-6)
    train, evaluate = _decisions()
    assert train.how == evaluate.how == "measured"
    assert set(train.times) == set(evaluate.times) == set(LOSS_PATHS)
    assert train.picked == min(train.times, key=train.times.get)
    assert "forward + backward" in train.shape and "forward + backward" not in evaluate.shape


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_measures_the_paths_and_each_gives_the_reference(fresh_kernel_choices):
    """On a GPU, at GPT-2's padded vocabulary under bf16 autocast: the choice is measured among every path
    (the full one fits here), is cached, and the loss it picks, like every path, follows float32 autograd."""
    torch._dynamo.reset()
    g = torch.Generator(device="cuda").manual_seed(0)
    n, width, vocab, rows = 4096, 768, 50257, 50304
    hidden = torch.randn(n, width, device="cuda", generator=g)
    weight = 0.02 * torch.randn(rows, width, device="cuda", generator=g)
    targets = torch.randint(0, vocab, (n,), device="cuda", generator=g)
    targets[:100] = -1
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    F.cross_entropy(h @ w[:vocab].T, targets, ignore_index=-1).backward()
    for path in ("chosen", *LOSS_PATHS):
        h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            run = LOSS_PATHS.get(path, lm_head_loss)
            loss = run(h2, w2, targets, vocab)
        loss.backward()
        for got, want in ((h2.grad, h.grad), (w2.grad, w.grad)):
            torch.testing.assert_close(got.float(), want, rtol=0, atol=2e-2 * want.abs().max().item(), msg=path)
        assert not w2.grad[vocab:].any(), path
    (decision,) = _decisions()
    assert decision.how == "measured" and set(decision.times) == set(LOSS_PATHS)
    assert decision.picked == min(decision.times, key=decision.times.get)
