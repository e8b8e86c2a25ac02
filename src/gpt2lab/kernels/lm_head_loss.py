"""The LM head and its cross-entropy, the training loss, computed the way that is fastest on the device.

Applied from outside the model: :func:`lm_head_loss` takes :meth:`GPT.hidden_states` and the head's weight,
and :class:`LanguageModelLoss` wraps a model into the module whose forward is the training loss (what the
trainer wraps in DDP / FSDP). Generation and per-token evaluation, which need the logits, use the plain head.

Two paths compute the same mean cross-entropy, over the first ``vocab_size`` columns of ``hidden @ weight.T``
only (a padded vocabulary's extra rows are no token: :class:`gpt2lab.model.GPT`):

* **full** (:func:`full_loss`): the logits in one product, then ``F.cross_entropy``, compiled: Inductor fuses
  the upcast, the softmax and its gradient into a few passes over the logits, which it holds in memory.
* **chunked** (:class:`LMHeadLoss`): rows in chunks, each chunk's gradient going straight into the gradients of
  the hidden states and the weight; the (tokens x vocab) logits never exist at once.

Eager, a CPU takes the chunked path, with chunks sized for its caches. On CUDA the full path and the chunked one
with chunks sized for a GPU (:data:`LOSS_PATHS`) are timed on the first call of each shape, forward and
backward, and the fastest is kept for the process (:mod:`gpt2lab.kernels.choice`; ``GPT2LAB_KERNEL=loss_full``
or a chunked name pins one). Under ``torch.compile`` (the trainer's ``compile = true``) the loss is traced into
the model's graph, where nothing can be timed: every device takes the full path there, which compiles without
a graph break. On a CPU that was measured too: a compiled training step of a 6-layer, 384-wide GPT-2 (2,048
tokens, 50,304-row head) ran 1.5-1.6x faster with the full path than with the chunked one, fp32 and bf16
(docs/benchmarks.md, training), at the cost of holding the logits.
"""

from __future__ import annotations

import functools
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from gpt2lab.kernels.choice import cached, candidates, choose

# Devices whose loss path is chosen by measurement; every other one takes the chunked path.
CHOOSING_DEVICES = ("cuda",)


def lm_head_loss(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, vocab_size: int | None = None
) -> torch.Tensor:
    """Mean cross-entropy of the logits ``(hidden @ weight.T)[:, :vocab_size]`` against ``targets``, targets
    of -1 ignored: ``F.cross_entropy(logits, targets, ignore_index=-1)``, by the path this device runs fastest.
    hidden: (B, T, C) or (N, C); weight: (Vp, C), its first ``vocab_size`` rows (default: all) the real
    vocabulary; targets: (B, T) or (N,)."""
    hidden, targets = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)  # (N, C), (N,)
    vocab_size = vocab_size or weight.shape[0]
    if torch.compiler.is_compiling():  # traced into the step's graph: nothing to time, and Inductor fuses it
        return full_loss(hidden, weight, targets, vocab_size)
    if hidden.device.type not in CHOOSING_DEVICES:
        return LMHeadLoss.apply(hidden, weight, targets, vocab_size)
    path = loss_path(hidden, weight, targets, vocab_size)
    return LOSS_PATHS[path](hidden, weight, targets, vocab_size)


class LanguageModelLoss(nn.Module):
    """A GPT and its training loss as one module: ``forward(idx, targets)`` -> the mean next-token loss.

    The trainer calls the loss through this module so that DDP and FSDP, which act around a module's
    forward, see the whole computation; the model itself stays the ``model`` attribute.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        hidden = self.model.hidden_states(idx)  # (B, T, C)
        return lm_head_loss(hidden, self.model.lm_head.weight, targets, self.model.config.vocab_size)


# ---------------------------------------------------------------------------------------- the full path


def full_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """``F.cross_entropy`` over the logits, held in memory. The product covers the padded vocabulary, whose
    multiple-of-64 width keeps it aligned for tensor cores; the softmax covers the real one only."""
    logits = hidden @ weight.T  # (N, Vp), in the autocast dtype under autocast
    return F.cross_entropy(logits[:, :vocab_size].float(), targets, ignore_index=-1)


@functools.cache
def _compiled_full_loss():
    """:func:`full_loss` through ``torch.compile``, built on first use (compiled per shape on first call)."""
    return torch.compile(full_loss)


def _run_compiled_full_loss(hidden, weight, targets, vocab_size):
    return _compiled_full_loss()(hidden, weight, targets, vocab_size)


def _chunked(chunk_bytes: int):
    def run(hidden, weight, targets, vocab_size):
        return LMHeadLoss.apply(hidden, weight, targets, vocab_size, chunk_bytes)

    return run


# The paths a CUDA device chooses from, by the names GPT2LAB_KERNEL pins; each is called as
# (hidden (N, C), weight (Vp, C), targets (N,), vocab_size).
LOSS_PATHS = candidates(
    {
        "loss_full": (_run_compiled_full_loss, "training loss: the logits in one product, compiled F.cross_entropy"),
        "loss_chunked_256mib": (_chunked(256 * 2**20), "training loss in chunks of 256 MiB of logits"),
        "loss_chunked_1gib": (_chunked(2**30), "training loss in chunks of 1 GiB of logits"),
    }
)
CHUNKED_FALLBACK = "loss_chunked_256mib"  # what a pin of loss_full falls back to where it cannot run


# ---------------------------------------------------------------------------------------- the choice


def loss_path(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, vocab_size: int) -> str:
    """The name (in :data:`LOSS_PATHS`) of the fastest path for this shape: timed on first use, then cached
    (pinned by ``GPT2LAB_KERNEL``). Each trial runs forward and backward (forward alone when no gradient is
    wanted) on detached copies of the inputs, under the caller's autocast, so nothing of the caller's graph
    is touched; the full path is left out where its logits would not fit in free memory."""
    device = hidden.device
    dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else weight.dtype
    grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    N, C, Vp = hidden.shape[0], hidden.shape[1], weight.shape[0]
    key = ("lm head loss", str(device), N, C, Vp, vocab_size, dtype, grad)
    picked = cached(key)
    if picked is not None:
        return picked
    trials = {name: _trial(path, hidden, weight, targets, vocab_size, grad) for name, path in LOSS_PATHS.items()}
    if not _full_loss_fits(N, Vp, dtype, device):
        trials["loss_full"] = None
    shape = f"{N} tokens, {C} -> {vocab_size} of {Vp} rows, {str(dtype).removeprefix('torch.')}"
    _synchronize(device)  # the caller's queued work must not count as the first trial's
    shape += ", forward + backward" if grad else ""
    try:
        return choose(key, "lm head loss", shape, trials, CHUNKED_FALLBACK)
    except _compile_failure() as error:  # no C++ compiler, no Triton: chosen again without the full path
        warnings.warn(f"compiled loss unavailable ({type(error).__name__}): the loss runs in chunks", stacklevel=3)
        return choose(key, "lm head loss", shape, {**trials, "loss_full": None}, CHUNKED_FALLBACK)


def _trial(path, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, vocab_size: int, grad: bool):
    """A call that runs ``path`` once on copies of the inputs and waits for the device."""
    h, w = hidden.detach().requires_grad_(grad), weight.detach().requires_grad_(grad)

    def run() -> None:
        loss = path(h, w, targets, vocab_size)
        if grad:
            loss.backward()
            h.grad = w.grad = None
        _synchronize(h.device)

    return run


def _full_loss_fits(tokens: int, rows: int, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether the full path's logits, their fp32 softmax and their gradient fit in the device's free memory."""
    if device.type != "cuda":
        return True
    need = tokens * rows * (2 * dtype.itemsize + 4)
    return need < 0.8 * torch.cuda.mem_get_info(device)[0]


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _compile_failure() -> type[Exception]:
    """The exception torch.compile raises when its backend cannot compile, imported once compiling has
    loaded torch._dynamo (about 70 MiB of imports no process should carry before it compiles)."""
    from torch._dynamo.exc import BackendCompilerFailed

    return BackendCompilerFailed


# ---------------------------------------------------------------------------------------- the chunked path


class LMHeadLoss(torch.autograd.Function):
    """Mean cross-entropy of ``hidden @ weight.T`` against ``targets``, never holding the (N, vocab) logits.

    With GPT-2's 50,257-word vocabulary the logits are the largest activation of a training step (4 bytes
    x 50,257 per token in fp32), and the usual path keeps three tensors of that size alive: the logits,
    their log-softmax and its gradient. Here rows are processed in chunks of 32 MiB of logits, sized for a
    CPU's caches (``chunk_bytes`` sets another size: :data:`LOSS_PATHS`), and each chunk's gradient
    (softmax - one-hot) goes straight into the gradients of ``hidden`` and ``weight``: forward does the
    backward's matrix products and backward only scales them. Same FLOPs, a fraction of the memory and of
    the elementwise passes. The idea of Liger Kernel's fused linear cross-entropy (Hsu et al. 2024), written
    here with PyTorch operations.

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
