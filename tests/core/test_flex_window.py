"""Sliding windows through FlexAttention, checked against a dense boolean-mask SDPA call, and the choice
between FlexAttention and the banded kernel (gpt2lab.sliding_window).

Flex runs for real on CPU (forward only, compiled, small shapes so compilation stays short); the choice
tests replace it by the dense reference to see when it is called, without compiling. CUDA tests cover
forward and backward, which a CPU cannot run through flex."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

import gpt2lab.kernels.choice as kernel_choice
import gpt2lab.sliding_window as sliding_window
from gpt2lab import GPT, GPTConfig
from gpt2lab.sliding_window import (
    flex_runs,
    flex_sliding_window_attention,
    sliding_window_attention,
    window_block_mask,
    window_kernel,
)

pytestmark = pytest.mark.usefixtures("fresh_kernel_choices", "fresh_flex_state")
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture
def fresh_flex_state(monkeypatch):
    """No compile failure, shape count or block mask carried over from another test."""
    monkeypatch.setattr(sliding_window, "_flex_failure", None)
    monkeypatch.setattr(sliding_window, "_flex_shapes", set())
    monkeypatch.setattr(sliding_window, "_block_masks", {})


@pytest.fixture
def flex_calls(monkeypatch) -> list[int]:
    """flex_sliding_window_attention replaced by the dense reference: records the T of each call, compiles nothing."""
    calls = []

    def fake_flex(q, k, v, window):
        calls.append(q.shape[2])
        return dense_window(q, k, v, window)

    monkeypatch.setattr(sliding_window, "flex_sliding_window_attention", fake_flex)
    return calls


def _pin(monkeypatch, name: str) -> None:
    monkeypatch.setenv(kernel_choice.ENV, name)
    kernel_choice.forget()


def dense_window(q, k, v, window):
    """The reference: one SDPA call with the (T, T) boolean mask of the window, written out from its definition."""
    T = q.shape[2]
    i, j = torch.arange(T, device=q.device)[:, None], torch.arange(T, device=q.device)[None, :]
    visible = (j <= i) & (i - j < window)  # query i sees keys i-W+1 .. i
    return F.scaled_dot_product_attention(q, k, v, attn_mask=visible, enable_gqa=q.shape[1] != k.shape[1])


def qkv(B, nh, nkv, T, hs, device="cpu", dtype=torch.float32):
    g = torch.Generator().manual_seed(T * 31 + nh * 7 + nkv)
    return [torch.randn(B, h, T, hs, generator=g).to(device, dtype) for h in (nh, nkv, nkv)]


# ---------------------------------------------------------------------------------------- flex itself


@pytest.mark.parametrize(
    "T, window, nh, nkv",
    [(256, 32, 2, 2), (256, 64, 2, 1), (200, 48, 2, 1)],  # GQA 2 -> 1; T and W not multiples of the 128 block
)
def test_flex_on_cpu_matches_the_dense_mask(T, window, nh, nkv):
    q, k, v = qkv(2, nh, nkv, T, 16)
    q.requires_grad_()  # flex on CPU refuses such inputs even under no_grad: the function detaches them
    with torch.no_grad():
        y = flex_sliding_window_attention(q, k, v, window)
    assert y.shape == (2, nh, T, 16)
    torch.testing.assert_close(y, dense_window(q, k, v, window), atol=1e-5, rtol=1e-5)


@pytest.mark.slow  # one compilation of the caller: ~16 s on 2 cores
def test_flex_traced_inside_a_compiled_function_matches_the_dense_mask():
    """The path a compiled model takes: Dynamo traces the block mask and flex into the caller's graph."""
    q, k, v = qkv(1, 2, 1, 256, 16)
    compiled = torch.compile(lambda q, k, v: flex_sliding_window_attention(q, k, v, 40), dynamic=False)
    with torch.no_grad():
        y = compiled(q, k, v)
    torch.testing.assert_close(y, dense_window(q, k, v, 40), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "T, window", [(256, 32), (200, 64), (1000, 128), (1024, 256), (700, 300), (130, 129), (384, 1)]
)
def test_block_mask_equals_torchs_create_block_mask(T, window):
    """Built block by block here; torch's create_block_mask evaluates the mask at every (query, key) pair."""
    from torch.nn.attention.flex_attention import create_block_mask

    def in_window(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (q_idx - kv_idx < window)

    reference = create_block_mask(in_window, None, None, T, T, device="cpu")
    ours = window_block_mask(T, window)
    assert ours.seq_lengths == (T, T) and ours.BLOCK_SIZE == reference.BLOCK_SIZE
    for name in ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices", "q_num_blocks", "q_indices"):
        assert torch.equal(getattr(ours, name), getattr(reference, name)), name


def test_block_mask_lists_only_the_blocks_the_window_reaches():
    """W = 256 over 128-token blocks: query block a needs key blocks a (partial: causal), a-1 (full) and a-2
    (partial), none before: 3 of the 64 blocks, not the up-to-64 of full causal attention."""
    mask = window_block_mask(8192, 256)
    listed = mask.kv_num_blocks + mask.full_kv_num_blocks  # (1, 1, 64)
    assert listed.tolist() == [[[1, 2] + [3] * 62]]
    assert int(mask.full_kv_num_blocks.sum()) == 63


# ---------------------------------------------------------------------------------------- the choice


def test_where_flex_can_run():
    assert flex_runs("cuda", True, torch.bfloat16, 64)  # CUDA trains through flex
    assert flex_runs("cuda", False, torch.float32, 16)
    assert not flex_runs("cuda", False, torch.float32, 8)  # Triton's products need 16 columns
    assert flex_runs("cpu", False, torch.float32, 16)
    assert not flex_runs("cpu", True, torch.float32, 16)  # no backward on CPU
    assert not flex_runs("cpu", False, torch.float64, 16)
    assert not flex_runs("mps", False, torch.float32, 64)


def test_cpu_takes_the_banded_kernel_unless_flex_is_pinned(flex_calls):
    q, k, v = qkv(1, 2, 1, 96, 16)
    with torch.no_grad():
        y = sliding_window_attention(q, k, v, 32)
    assert flex_calls == [] and window_kernel(q, k, v) == "banded_window"
    assert kernel_choice.decisions() == []  # nothing measured: no compilation behind a prefill's back
    torch.testing.assert_close(y, dense_window(q, k, v, 32), atol=1e-5, rtol=1e-5)


def test_pinned_flex_runs_for_cpu_inference_but_not_with_dropout(flex_calls, monkeypatch):
    _pin(monkeypatch, "flex_window")
    q, k, v = qkv(2, 4, 2, 150, 16)
    with torch.no_grad():
        y = sliding_window_attention(q, k, v, 32)
        assert window_kernel(q, k, v, dropout_p=0.1) == "banded_window"  # flex has no dropout
    assert flex_calls == [150]
    assert [(d.operation, d.picked, d.how) for d in kernel_choice.decisions()] == [
        ("sliding window", "flex_window", "pinned")
    ]
    torch.testing.assert_close(y, dense_window(q, k, v, 32), atol=1e-5, rtol=1e-5)


def test_cpu_training_takes_the_banded_kernel_even_with_flex_pinned(flex_calls, monkeypatch):
    """Flex has no backward on CPU: the pin falls back with one warning, and gradients are the reference's."""
    _pin(monkeypatch, "flex_window")
    q, k, v = (t.requires_grad_() for t in qkv(2, 4, 2, 100, 16))
    with pytest.warns(UserWarning, match="GPT2LAB_KERNEL=flex_window: not available here, using banded_window"):
        y = sliding_window_attention(q, k, v, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the choice is cached: no second warning
        sliding_window_attention(q, k, v, 32)
    assert flex_calls == []
    assert [(d.picked, d.how) for d in kernel_choice.decisions()] == [("banded_window", "fallback")]
    expected = dense_window(q, k, v, 32)
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)
    grad = torch.randn_like(y)
    grads, expected_grads = torch.autograd.grad(y, (q, k, v), grad), torch.autograd.grad(expected, (q, k, v), grad)
    for got, want in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_a_window_covering_the_sequence_is_plain_causal_attention(flex_calls, monkeypatch):
    _pin(monkeypatch, "flex_window")
    q, k, v = qkv(1, 2, 2, 64, 16)
    with torch.no_grad():
        y = sliding_window_attention(q, k, v, 64)
    assert flex_calls == []
    torch.testing.assert_close(y, F.scaled_dot_product_attention(q, k, v, is_causal=True))


class _CompileFailed(RuntimeError):
    """Shaped like torch._dynamo's BackendCompilerFailed: the backend's own error in ``inner_exception``."""

    def __init__(self) -> None:
        super().__init__("backend='inductor' raised:\nInvalidCxxCompiler: No working C++ compiler found")
        self.inner_exception = RuntimeError("InvalidCxxCompiler: No working C++ compiler found")


@pytest.mark.parametrize(
    "error, reason",
    [
        (ImportError("cannot import name 'flex_attention'"), "cannot import name 'flex_attention'"),  # an old torch
        (_CompileFailed(), "InvalidCxxCompiler: No working C++ compiler found"),
    ],
    ids=["old torch", "no compiler"],
)
def test_flex_that_cannot_run_falls_back_to_banded_with_one_warning(error, reason, monkeypatch):
    calls = []

    def broken_flex(q, k, v, window):
        calls.append(window)
        raise error

    monkeypatch.setattr(sliding_window, "flex_sliding_window_attention", broken_flex)
    _pin(monkeypatch, "flex_window")
    q, k, v = qkv(1, 2, 2, 130, 16)
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        outputs = [sliding_window_attention(q, k, v, 32) for _ in range(3)]
    assert calls == [32]  # tried once, never again in this process
    assert [str(w.message) for w in caught] == [
        f"FlexAttention unavailable ({reason}): sliding windows run on the banded kernel"
    ]
    assert window_kernel(q, k, v) == "banded_window"
    for y in outputs:
        torch.testing.assert_close(y, dense_window(q, k, v, 32), atol=1e-5, rtol=1e-5)


def test_flex_compiles_for_a_bounded_number_of_shapes(flex_calls, monkeypatch):
    """Past the limit new shapes take the banded kernel (the compiled call would otherwise run flex eagerly,
    every score in memory); lengths in one 128-token bucket share a compiled shape."""
    monkeypatch.setattr(sliding_window, "FLEX_SHAPES_MAX", 2)
    _pin(monkeypatch, "flex_window")
    with torch.no_grad():
        for T in (130, 250, 300, 400, 130):  # buckets 256, 256, 384, 512 (one too many), 256
            q, k, v = qkv(1, 2, 1, T, 16)
            y = sliding_window_attention(q, k, v, 32)
            torch.testing.assert_close(y, dense_window(q, k, v, 32), atol=1e-5, rtol=1e-5)
    assert flex_calls == [130, 250, 300, 130]


def test_a_windowed_model_gives_the_same_logits_through_flex(monkeypatch):
    """What attention.py calls: a GQA model with RoPE and windows on both layers, prefilled through flex (pinned)
    and through the banded kernel."""
    config = GPTConfig(
        n_layer=2, n_head=2, n_kv_head=1, n_embd=32, block_size=256, vocab_size=97, window=48, pos_encoding="rope"
    )
    model = GPT(config).eval()
    idx = torch.randint(0, 97, (2, 200))
    with torch.no_grad():
        banded = model(idx)
        _pin(monkeypatch, "flex_window")
        flex = model(idx)
    assert [d.picked for d in kernel_choice.decisions()] == ["flex_window"]
    assert len(sliding_window._flex_shapes) == 1  # both layers ran flex, through one compiled shape
    torch.testing.assert_close(flex, banded, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------- CUDA


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want.float()).norm() / want.float().norm())


@pytest.fixture
def full_fp32_products():
    """fp32 products in full precision (flex reads the setting too): another test may have allowed TF32."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(before)


@CUDA
@pytest.mark.usefixtures("full_fp32_products")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("T, window, nh, nkv", [(1024, 256, 4, 2), (1000, 128, 4, 4), (512, 64, 4, 1)])
def test_flex_on_cuda_matches_the_dense_mask_forward_and_backward(T, window, nh, nkv, dtype):
    q, k, v = (t.requires_grad_() for t in qkv(2, nh, nkv, T, 64, "cuda", dtype))
    y = flex_sliding_window_attention(q, k, v, window)
    expected = dense_window(q.float(), k.float(), v.float(), window)  # fp32 from the same inputs
    grad = torch.randn_like(y)
    grads = torch.autograd.grad(y, (q, k, v), grad)
    expected_grads = torch.autograd.grad(expected, (q, k, v), grad.float())
    limit = 1e-5 if dtype == torch.float32 else 1e-2  # bf16: a few roundings of 2^-8
    for got, want in [(y, expected), *zip(grads, expected_grads, strict=True)]:
        assert got.dtype == dtype
        assert _relative_error(got, want) < limit


@CUDA
@pytest.mark.usefixtures("full_fp32_products")
def test_cuda_training_runs_flex_and_agrees_with_banded_eager_and_compiled(monkeypatch):
    """A small windowed GPT's loss and gradients on CUDA: flex (the default, eager and inside a compiled model)
    against the banded kernel (pinned)."""
    config = GPTConfig(
        n_layer=2, n_head=4, n_kv_head=2, n_embd=128, block_size=512, vocab_size=97, window=128, pos_encoding="rope"
    )
    torch.manual_seed(0)
    model = GPT(config).cuda()
    idx = torch.randint(0, 97, (2, 512), device="cuda")
    q = torch.randn(2, 4, 512, 32, device="cuda", requires_grad=True)
    assert window_kernel(q, q[:, :2], q[:, :2]) == "flex_window"

    def loss_and_grads(forward):
        loss = F.cross_entropy(forward(idx).flatten(0, 1), idx.flatten())
        return [loss, *torch.autograd.grad(loss, list(model.parameters()))]

    flex = loss_and_grads(model)
    compiled = loss_and_grads(torch.compile(model))
    assert len(sliding_window._flex_shapes) == 1
    _pin(monkeypatch, "banded_window")
    banded = loss_and_grads(model)
    assert [d.picked for d in kernel_choice.decisions()] == ["banded_window"]
    for a, b, c in zip(flex, compiled, banded, strict=True):
        assert _relative_error(a, c) < 1e-5 and _relative_error(b, c) < 1e-5
