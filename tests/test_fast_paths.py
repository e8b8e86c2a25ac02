"""Speed-motivated code paths compute the same thing as the plain ones."""

import pytest
import torch
import torch.nn.functional as F

import gpt2lab.attention as attention
from gpt2lab.attention import Linear


@pytest.mark.parametrize("rows", [1, 5])
@pytest.mark.parametrize("bias", [True, False])
def test_bf16_linear_matches_the_plain_bf16_product(rows, bias, monkeypatch):
    """On a CPU without bf16 matrix instructions, several-row products go through fp32; the result must
    be the bf16 product that nn.Linear would give (both accumulate in fp32 and round once)."""
    monkeypatch.setattr(attention, "_cpu_has_bf16_matmul", lambda: False)
    layer = Linear(64, 48, bias=bias).to(torch.bfloat16)
    x = torch.randn(2, rows, 64).to(torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    expected = F.linear(x.float(), layer.weight.float(), None if layer.bias is None else layer.bias.float())
    torch.testing.assert_close(y.float(), expected, atol=0, rtol=2**-8)  # at most one bf16 rounding
    plain = F.linear(x, layer.weight, layer.bias)
    torch.testing.assert_close(y, plain, atol=1e-2, rtol=2**-7)


def test_fp32_linear_is_nn_linear():
    layer = Linear(16, 8)
    x = torch.randn(3, 16)
    assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))
