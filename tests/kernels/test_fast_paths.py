"""Speed-motivated code paths compute the same thing as the plain ones."""

import pytest
import torch
import torch.nn.functional as F

import gpt2lab.kernels.choice as kernel_choice
import gpt2lab.kernels.cpu_linear as cpu_linear
import gpt2lab.sliding_window as sliding_window
from gpt2lab import GPT, GPTConfig, apply_inference_kernels
from gpt2lab.errors import GPT2LabError
from gpt2lab.kernels.cpu_linear import Linear

pytestmark = pytest.mark.usefixtures("fresh_kernel_choices")  # conftest: no choice cached across tests


def _pin(monkeypatch, name: str) -> None:
    monkeypatch.setenv(kernel_choice.ENV, name)
    kernel_choice.forget()


@pytest.mark.parametrize("kernel", ["linear", "upcast", "fbgemm_fp16"])
@pytest.mark.parametrize("rows", [1, 5, 300])
@pytest.mark.parametrize("bias", [True, False])
def test_bf16_linear_matches_the_plain_bf16_product(rows, bias, kernel, monkeypatch):
    """Every bf16 candidate without autograd (FBGEMM's 16-bit-weight kernel 7 rows at a time here, upcast
    weights, PyTorch's bf16 product), and the fp32 autograd path of a CPU without bf16 instructions, give
    the bf16 product that nn.Linear would give (all accumulate in fp32 and round once)."""
    monkeypatch.setattr(cpu_linear, "_cpu_has_bf16_matmul", lambda: False)
    monkeypatch.setattr(cpu_linear, "PACKED_RESULT_BYTES", 7 * 48 * 4)
    if kernel == "fbgemm_fp16" and not cpu_linear._has_fbgemm_fp16():
        pytest.skip("this PyTorch build has no FBGEMM")
    _pin(monkeypatch, kernel)
    layer = Linear(64, 48, bias=bias).to(torch.bfloat16)
    with torch.no_grad():  # magnitudes fp16 stores as subnormals, and fp16's largest: bf16 values fp16 holds
        layer.weight[0, :4] = torch.tensor([3e-6, -1e-8, 2e-38, 6e4])
    x = torch.randn(2, rows, 64).to(torch.bfloat16)
    expected = F.linear(x.float(), layer.weight.float(), None if layer.bias is None else layer.bias.float())
    plain = F.linear(x, layer.weight, layer.bias)
    with torch.no_grad():
        fast = layer(x)
    assert [(d.picked, d.how) for d in kernel_choice.decisions()] == [(kernel, "pinned")]
    for y in (layer(x), fast):  # with autograd (training a bf16 model), and without
        assert y.dtype == torch.bfloat16 and y.shape == plain.shape
        torch.testing.assert_close(y.float(), expected, atol=1e-5, rtol=2**-8)  # one bf16 rounding
        torch.testing.assert_close(y, plain, atol=1e-2, rtol=2**-7)


@pytest.mark.parametrize("kernel", ["linear", "upcast", "fbgemm_fp16"])
def test_fp16_linear_candidates_match_the_fp32_product_rounded_once(kernel, monkeypatch):
    if kernel == "fbgemm_fp16" and not cpu_linear._has_fbgemm_fp16():
        pytest.skip("this PyTorch build has no FBGEMM")
    _pin(monkeypatch, kernel)
    layer = Linear(64, 48).to(torch.float16)
    x = torch.randn(3, 5, 64).to(torch.float16)
    with torch.no_grad():
        y = layer(x)
    expected = F.linear(x.float(), layer.weight.float(), layer.bias.float())
    assert y.dtype == torch.float16 and [d.operation for d in kernel_choice.decisions()] == ["linear fp16"]
    torch.testing.assert_close(y.float(), expected, atol=1e-3, rtol=2**-10)


def test_bf16_packed_weights_follow_the_parameters(monkeypatch):
    """The FBGEMM copy is rebuilt when the weights change in place (loading) and dropped by .to(); a weight
    beyond fp16's range is not saturated: that layer computes from upcast weights instead."""
    _pin(monkeypatch, "fbgemm_fp16")
    layer = Linear(32, 16).to(torch.bfloat16)
    x = torch.randn(4, 32).to(torch.bfloat16)

    def reference():
        return F.linear(x.float(), layer.weight.float(), layer.bias.float())

    with torch.no_grad():
        before = layer(x)
        layer.load_state_dict({"weight": torch.randn(16, 32), "bias": torch.randn(16)})
        after = layer(x)
        torch.testing.assert_close(after.float(), reference(), atol=1e-5, rtol=2**-8)
        assert not torch.allclose(before, after)
        layer.weight[3, 5] = 1e5
        torch.testing.assert_close(layer(x).float(), reference(), atol=1e-5, rtol=2**-8)
        assert layer._fp16_pack[1] is None
        if cpu_linear._has_fbgemm_fp16():  # the first weights were packed; the saturating one not
            assert [d.how for d in kernel_choice.decisions()] == ["pinned"]
    assert layer.float()._fp16_pack is None


def test_fp32_linear_is_nn_linear():
    layer = Linear(16, 8)
    x = torch.randn(3, 16)
    assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))


@pytest.mark.parametrize("kernel", ["linear", "onednn", "transposed", None], ids=str)
@pytest.mark.parametrize("rows", [1, 8, 300])
@pytest.mark.parametrize("n_in, n_out", [(32, 96), (16, 1000)], ids=["layer", "vocabulary"])
@pytest.mark.parametrize("bias", [True, False])
def test_fp32_inference_linear_matches_nn_linear(rows, n_in, n_out, bias, kernel, monkeypatch):
    """Without autograd, every fp32 candidate (pinned) and the measured choice (None) give F.linear's values
    and shape, on a strided input as decoding passes (last position)."""
    if kernel is not None:
        _pin(monkeypatch, kernel)
    layer = Linear(n_in, n_out, bias=bias)
    x = torch.randn(rows, 3, n_in)[:, -1:]
    with torch.no_grad():
        y = layer(x)
    assert y.shape == (rows, 1, n_out) and y.dtype == torch.float32
    torch.testing.assert_close(y, F.linear(x, layer.weight, layer.bias), atol=1e-5, rtol=1e-5)
    (decision,) = kernel_choice.decisions()
    if kernel is None:
        assert decision.how == "measured" and decision.picked == min(decision.times, key=decision.times.get)
        assert {"linear", "transposed"} <= set(decision.times)
    elif cpu_linear._onednn_op() is not None:
        assert (decision.picked, decision.how) == (kernel, "pinned")


def test_missing_kernel_falls_back_to_f_linear(monkeypatch):
    """A build without oneDNN: pinning it warns and uses F.linear; measuring leaves it out."""
    monkeypatch.setattr(cpu_linear, "_onednn_op", lambda: None)
    layer = Linear(32, 64)
    x = torch.randn(4, 32)
    _pin(monkeypatch, "onednn")
    with torch.no_grad(), pytest.warns(UserWarning, match="onednn: not available here, using linear"):
        y = layer(x)
    assert torch.equal(y, F.linear(x, layer.weight, layer.bias))
    assert [(d.picked, d.how) for d in kernel_choice.decisions()] == [("linear", "fallback")]
    _pin(monkeypatch, "")
    with torch.no_grad():
        torch.testing.assert_close(layer(x), y)
    (decision,) = kernel_choice.decisions()
    assert decision.how == "measured" and set(decision.times) == {"linear", "transposed"}


def test_kernel_choice_is_measured_once_per_shape_and_cached(monkeypatch):
    """The first call of a (rows bucket, shape) times every candidate; later calls reuse the choice;
    5 and 7 rows share the bucket of 8, one row has its own."""
    calls = []
    measure = kernel_choice.measure
    monkeypatch.setattr(kernel_choice, "measure", lambda c: calls.append(sorted(c)) or measure(c))
    layer = Linear(16, 24)
    with torch.no_grad():
        for rows in (5, 7, 5, 1, 1):
            layer(torch.randn(rows, 16))
    assert len(calls) == 2 and "linear" in calls[0]
    assert [d.shape for d in kernel_choice.decisions()] == ["<=8 rows, 16->24 +bias", "<=1 rows, 16->24 +bias"]
    assert all(t > 0 for d in kernel_choice.decisions() for t in d.times.values())


def test_unknown_pinned_kernel_is_one_line(monkeypatch):
    _pin(monkeypatch, "onedn")
    with torch.no_grad(), pytest.raises(GPT2LabError, match="GPT2LAB_KERNEL: unknown kernel 'onedn'.*onednn"):
        Linear(8, 8)(torch.randn(2, 8))


def test_linear_under_autocast_runs_in_the_autocast_dtype():
    layer = Linear(16, 8)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(torch.randn(3, 16))
    assert y.dtype == torch.bfloat16


def _naive_window(q, k, v, window):
    T, group = q.shape[2], q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    i, j = torch.arange(T)[:, None], torch.arange(T)[None]
    scores = (q @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5
    return torch.softmax(scores.masked_fill((j > i) | (j <= i - window), float("-inf")), -1) @ v


def _sdpa_path(q, k, v, window):
    """The banded kernel through SDPA (the path taken with dropout or off CPU), padded like the caller does."""
    T = q.shape[2]
    padded = (F.pad(t, (0, 0, 0, -T % window)) for t in (q, k, v))
    return sliding_window._banded_sdpa(*padded, window, 0.0)[:, :, :T]


@pytest.mark.parametrize("kernel", [sliding_window.sliding_window_attention, _sdpa_path], ids=["cpu flash", "sdpa"])
@pytest.mark.parametrize(
    "batch, nh, nkv, T, window",
    [(2, 4, 4, 200, 64), (1, 4, 2, 300, 128), (3, 6, 1, 129, 32), (1, 2, 2, 96, 32)],
)
def test_banded_window_kernels_match_the_dense_reference(kernel, batch, nh, nkv, T, window):
    """Outputs and gradients on strided inputs (views of one packed projection, as in
    CausalSelfAttention), with GQA, MQA and T not a multiple of the window."""
    hs = 16
    packed = torch.randn(batch, T, (nh + 2 * nkv) * hs, requires_grad=True)
    q, k, v = packed.split([nh * hs, nkv * hs, nkv * hs], dim=2)
    q, k, v = (t.unflatten(2, (-1, hs)).transpose(1, 2) for t in (q, k, v))
    y = kernel(q, k, v, window)
    expected = _naive_window(q.double(), k.double(), v.double(), window)
    torch.testing.assert_close(y.double(), expected, atol=1e-5, rtol=1e-5)
    grad = torch.randn_like(y)
    (got,) = torch.autograd.grad(y, packed, grad)
    (want,) = torch.autograd.grad(expected, packed, grad.double())
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_banded_cpu_kernel_in_bf16_matches_the_sdpa_path():
    """bf16 inputs (autocast training): the operator returns an fp32 log-sum-exp that backward needs."""
    q, k, v = (torch.randn(2, 4, 100, 16, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    grad = torch.randn(2, 4, 100, 16, dtype=torch.bfloat16)
    y = sliding_window.sliding_window_attention(q, k, v, 32)
    ref = _sdpa_path(q, k, v, 32)
    torch.testing.assert_close(y, ref, atol=2e-2, rtol=2e-2)
    for got, want in zip(
        torch.autograd.grad(y, (q, k, v), grad), torch.autograd.grad(ref, (q, k, v), grad), strict=True
    ):
        torch.testing.assert_close(got, want, atol=5e-2, rtol=5e-2)


def test_bf16_model_with_packed_weights_gives_the_plain_bf16_logits(monkeypatch):
    """A whole bf16 GPT with the inference kernels swapped in, all positions at once and step by step with the
    KV cache, against the same model through plain nn.Linear (PyTorch's bf16 kernel, as on CPUs with bf16
    instructions)."""
    torch.manual_seed(0)
    model = apply_inference_kernels(GPT(GPTConfig.from_preset("tiny", vocab_size=300)), torch.bfloat16)
    assert len([m for m in model.modules() if type(m) is Linear]) == 2 * 4 + 1
    idx = torch.randint(0, 300, (2, 12))
    _pin(monkeypatch, "linear")
    with torch.no_grad():
        plain = model(idx).float()
    _pin(monkeypatch, "fbgemm_fp16")
    with torch.no_grad():
        full = model(idx).float()
        cache = model.new_cache(2, 12)
        steps = [model(idx[:, :8], cache=cache)] + [model(idx[:, t : t + 1], cache=cache) for t in range(8, 12)]
    if cpu_linear._has_fbgemm_fp16():
        assert all(m._fp16_pack[1] is not None for m in model.modules() if isinstance(m, Linear))
    torch.testing.assert_close(full, plain, atol=1e-2, rtol=1e-2)  # about one bf16 rounding (seen: 1e-4)
    torch.testing.assert_close(torch.cat(steps, dim=1).float(), plain, atol=1e-2, rtol=1e-2)
