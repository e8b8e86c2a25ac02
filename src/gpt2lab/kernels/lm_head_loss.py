"""The LM head and its cross-entropy in one pass, without the (tokens x vocab) logits in memory.

Applied from outside the model: :func:`lm_head_loss` takes :meth:`GPT.hidden_states` and the head's weight,
and :class:`LanguageModelLoss` wraps a model into the module whose forward is the training loss (what the
trainer wraps in DDP / FSDP). Generation and per-token evaluation, which need the logits, use the plain head.
The loss covers the first ``vocab_size`` columns only: a padded vocabulary's extra rows are no token
(:class:`gpt2lab.model.GPT`).
"""

from __future__ import annotations

import torch
from torch import nn


def lm_head_loss(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, vocab_size: int | None = None
) -> torch.Tensor:
    """Mean cross-entropy of the logits ``(hidden @ weight.T)[:, :vocab_size]`` against ``targets``, targets
    of -1 ignored: ``F.cross_entropy(logits, targets, ignore_index=-1)`` without the logits. hidden: (B, T, C)
    or (N, C); weight: (Vp, C), its first ``vocab_size`` rows (default: all) the real vocabulary; targets:
    (B, T) or (N,)."""
    return LMHeadLoss.apply(hidden.reshape(-1, hidden.shape[-1]), weight, targets.reshape(-1), vocab_size)


class LanguageModelLoss(nn.Module):
    """A GPT and its logit-free loss as one module: ``forward(idx, targets)`` -> the mean next-token loss.

    The trainer calls the loss through this module so that DDP and FSDP, which act around a module's
    forward, see the whole computation; the model itself stays the ``model`` attribute.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        hidden = self.model.hidden_states(idx)  # (B, T, C)
        return lm_head_loss(hidden, self.model.lm_head.weight, targets, self.model.config.vocab_size)


class LMHeadLoss(torch.autograd.Function):
    """Mean cross-entropy of ``hidden @ weight.T`` against ``targets``, never holding the (N, vocab) logits.

    With GPT-2's 50,257-word vocabulary the logits are the largest activation of a training step (4 bytes
    x 50,257 per token in fp32), and the usual path keeps three tensors of that size alive: the logits,
    their log-softmax and its gradient. Here rows are processed in chunks of 32 MiB of logits (``chunk_bytes``
    sets another size), and each chunk's gradient (softmax - one-hot) goes straight into the
    gradients of ``hidden`` and ``weight``: forward does the backward's matrix products and backward only
    scales them. Same FLOPs, a fraction of the memory and of the elementwise passes. The idea of Liger
    Kernel's fused linear cross-entropy (Hsu et al. 2024), written here with PyTorch operations.

    ``apply(hidden (N, C), weight (Vp, C), targets (N,), vocab_size=Vp, chunk_bytes=CHUNK_BYTES)``. Rows of
    ``weight`` past ``vocab_size`` (a padded vocabulary) take part in the products, which stay aligned, but
    not in the softmax: their gradient is zero. Targets equal to -1 are ignored, as in
    :func:`torch.nn.functional.cross_entropy`. Under autocast the products run in the autocast dtype; the
    softmax and the weight gradient's sum in fp32.
    """

    CHUNK_BYTES = 32 * 2**20  # logits of one chunk of rows

    @staticmethod
    def forward(ctx, hidden, weight, targets, vocab_size=None, chunk_bytes=None):
        # hidden: (N, C), weight: (Vp, C), targets: (N,)
        device = hidden.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
        need_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        N, Vp, V = hidden.shape[0], weight.shape[0], vocab_size or weight.shape[0]
        with torch.autocast(device, enabled=False):
            w, valid, index = weight.to(dtype), targets != -1, targets.clamp(min=0)
            count = valid.sum()
            scale = 1.0 / count.clamp(min=1)  # mean over the counted targets
            total = torch.zeros((), device=hidden.device, dtype=torch.float32)
            grad_hidden = torch.empty_like(hidden) if need_grad else None
            grad_weight = torch.zeros_like(weight, dtype=torch.float32) if need_grad else None
            rows = min(N, max(1, (chunk_bytes or LMHeadLoss.CHUNK_BYTES) // (4 * Vp)))
            # One buffer for every chunk: a fresh allocation this large is page-faulted in every time.
            buffer = torch.empty(Vp * rows, device=hidden.device, dtype=dtype)
            for start in range(0, N, rows):
                chunk = slice(start, min(start + rows, N))
                grads = (grad_hidden[chunk], grad_weight) if need_grad else None
                total += _chunk_loss(hidden[chunk].to(dtype), w, index[chunk], valid[chunk], V, buffer, grads)
        if need_grad:
            ctx.save_for_backward(grad_hidden, grad_weight, scale)
            ctx.weight_dtype = weight.dtype
        # An empty target set gives nan, as F.cross_entropy does.
        return torch.where(count > 0, total * scale, torch.nan)

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        grad_hidden, grad_weight, scale = ctx.saved_tensors
        factor = grad_loss * scale  # the loss's gradient (the loss scale in fp16 training) / count
        return grad_hidden * factor, (grad_weight * factor).to(ctx.weight_dtype), None, None, None


def _chunk_loss(h, w, index, ok, vocab_size: int, buffer: torch.Tensor, grads) -> torch.Tensor:
    """The summed loss of one chunk of n rows (h (n, C), index and ok (n,)); with ``grads`` = (this chunk's
    rows of the hidden states' gradient, the weight's gradient), its gradients written into them."""
    Vp, n = w.shape[0], h.shape[0]
    # Logits transposed, (Vp, n): on CPU this product runs faster than (n, Vp) (docs/benchmarks.md).
    logits = torch.mm(w, h.T, out=buffer[: Vp * n].view(Vp, n)).float()
    real = logits[:vocab_size]  # (V, n): the padded vocabulary's rows follow, no token, out of the softmax
    lse = torch.logsumexp(real, dim=0)  # (n,)
    loss = ((lse - real.gather(0, index[None])[0]) * ok).sum()
    if grads is None:
        return loss
    # d(mean loss)/d(logits) = (softmax - one-hot) / count, zero for ignored targets and for padded rows. The
    # 1/count is applied in backward, together with the loss scale of fp16 training: values as small as
    # 1/count would underflow in fp16 before the scale could lift them.
    real.sub_(lse).exp_()
    logits[vocab_size:].zero_()
    logits.scatter_add_(0, index[None], torch.full_like(logits[:1], -1.0))
    logits.mul_(ok)
    g = logits.to(w.dtype)  # (Vp, n)
    grad_hidden, grad_weight = grads
    grad_hidden.copy_(g.T @ w)
    if w.dtype == grad_weight.dtype:
        grad_weight.addmm_(g, h)
    else:
        grad_weight += (g @ h).float()
    return loss
