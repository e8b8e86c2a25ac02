"""Training batches made ready before the step that uses them.

Each step's offsets are drawn from the run's batch generator in step order, one draw per step, exactly
as they would be drawn at step time (:func:`~gpt2lab.data.tokens.sample_offsets`); the rows are gathered
(:func:`~gpt2lab.data.tokens.gather_batch`) on a background thread while the device computes the step
before, into page-locked (pinned) memory on CUDA, and copied to the device with ``non_blocking=True``:
the host neither waits for a copy nor gathers while the device idles.

Exact resume: drawing one step ahead moves the generator past batches no step has used yet, so
:meth:`BatchLoader.generator_state` is the generator's state as of the batches handed out (the state
before the oldest draw not yet consumed). A checkpoint records that state; a resumed run sets the
generator to it and draws the same next batch as the run that never stopped.

On a CPU device the rows are gathered at step time on the calling thread: compute and gathering
share the same cores there, and there is no copy to overlap.
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch

from gpt2lab.data.tokens import ShardedTokens, gather_batch, sample_offsets


class BatchLoader:
    """This process's micro-batches of every training step, in order.

    The global batch of a step is ``grad_accum`` micro-batches of ``batch_size`` rows of ``seq_len`` tokens,
    drawn with one :func:`sample_offsets` call from ``generator`` (the same on every process); this process
    takes micro-batches ``first`` .. ``first + count - 1`` of it, so N processes see what one would.
    ``background`` (default: on CUDA devices) gathers one step ahead on a thread.
    """

    def __init__(
        self,
        tokens: np.ndarray | ShardedTokens,
        seq_len: int,
        batch_size: int,
        grad_accum: int,
        mine: tuple[int, int],
        generator: torch.Generator,
        device: torch.device,
        background: bool | None = None,
    ) -> None:
        self.tokens, self.seq_len, self.batch_size, self.grad_accum = tokens, seq_len, batch_size, grad_accum
        self.first, self.count = mine
        self.generator, self.device = generator, device
        self.pin = device.type == "cuda"  # page-locked rows: the copy runs without the host waiting
        self.background = device.type == "cuda" if background is None else background
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="gpt2lab-batches") if self.background else None
        # Steps drawn but not handed out: (generator state before the draw, rows or the future rows).
        self._pending: deque[tuple[torch.Tensor, Future | torch.Tensor]] = deque()

    def next_step(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The next step's micro-batches on the device: ``count`` pairs (inputs, targets), each (B, T) int64."""
        if not self._pending:
            self._draw()
        _, rows = self._pending.popleft()
        if self._pool is not None:
            self._draw()  # the next step's rows are gathered while this step computes
            rows = rows.result()
        rows = rows.to(self.device, non_blocking=self.pin)  # (2, count, B, T): one copy per step
        return [(rows[0, i], rows[1, i]) for i in range(self.count)]

    def generator_state(self) -> torch.Tensor:
        """The batch generator's state as of the batches handed out: what a checkpoint records."""
        return self._pending[0][0] if self._pending else self.generator.get_state()

    def close(self) -> None:
        """Stop the thread and set the generator back to :meth:`generator_state` (nothing drawn ahead)."""
        if self._pending:
            self.generator.set_state(self._pending[0][0])
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        self._pending.clear()

    def _draw(self) -> None:
        state = self.generator.get_state()
        offsets = sample_offsets(len(self.tokens), self.seq_len, self.grad_accum * self.batch_size, self.generator)
        mine = offsets.view(self.grad_accum, self.batch_size)[self.first : self.first + self.count].reshape(-1)
        rows = self._pool.submit(self._gather, mine) if self._pool is not None else self._gather(mine)
        self._pending.append((state, rows))

    def _gather(self, offsets: torch.Tensor) -> torch.Tensor:
        """Inputs and targets of ``offsets`` as one contiguous (2, count, B, T) tensor (pinned on CUDA)."""
        x, y = gather_batch(self.tokens, offsets, self.seq_len)  # (count·B, T) each
        rows = torch.empty((2, *x.shape), dtype=x.dtype, pin_memory=self.pin)
        rows[0].copy_(x)
        rows[1].copy_(y)
        return rows.view(2, self.count, self.batch_size, self.seq_len)
