"""The training loader: the batches a step would draw at step time, whether gathered inline or one step
ahead on a thread, this process's share of them, and a generator state that resumes exactly although
the loader has drawn ahead (issue 24, item 3)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gpt2lab.data.loader import BatchLoader
from gpt2lab.data.tokens import ShardedTokens

CPU = torch.device("cpu")
SEQ, B, ACCUM = 8, 3, 4


@pytest.fixture
def tokens() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 1000, size=5000).astype(np.uint16)


def expected_steps(tokens: np.ndarray, seed: int, steps: int, first: int = 0, count: int = ACCUM) -> list:
    """Independent reference: per step, one randint draw of ACCUM·B window starts from a generator, the
    windows cut straight from the array; micro-batches ``first`` .. ``first + count - 1`` of it."""
    gen, out = torch.Generator().manual_seed(seed), []
    for _ in range(steps):
        starts = torch.randint(len(tokens) - SEQ, (ACCUM * B,), generator=gen).tolist()
        rows = [np.asarray(tokens[s : s + SEQ + 1], dtype=np.int64) for s in starts]
        micro = [rows[i * B : (i + 1) * B] for i in range(ACCUM)][first : first + count]
        out.append([(np.stack([r[:-1] for r in m]), np.stack([r[1:] for r in m])) for m in micro])
    return out


def loader(tokens, seed: int, background: bool, mine=(0, ACCUM), state=None) -> BatchLoader:
    gen = torch.Generator().manual_seed(seed)
    if state is not None:
        gen.set_state(state)
    return BatchLoader(tokens, SEQ, B, ACCUM, mine, gen, CPU, background=background)


def assert_same(got: list[tuple[torch.Tensor, torch.Tensor]], want: list[tuple[np.ndarray, np.ndarray]]) -> None:
    assert len(got) == len(want)
    for (x, y), (wx, wy) in zip(got, want, strict=True):
        assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape == (B, SEQ)
        assert x.is_contiguous() and y.is_contiguous()
        np.testing.assert_array_equal(x.numpy(), wx)
        np.testing.assert_array_equal(y.numpy(), wy)


@pytest.mark.parametrize("background", [False, True])
def test_batches_are_those_drawn_at_step_time(tokens, background):
    batches = loader(tokens, seed=7, background=background)
    try:
        for want in expected_steps(tokens, seed=7, steps=5):
            assert_same(batches.next_step(), want)
    finally:
        batches.close()


@pytest.mark.parametrize("background", [False, True])
def test_each_process_takes_its_own_micro_batches_of_the_same_global_batch(tokens, background):
    """Process 1 of 2 (two micro-batches each) gets micro-batches 2 and 3 of the one-process batch."""
    batches = loader(tokens, seed=3, background=background, mine=(2, 2))
    try:
        for want in expected_steps(tokens, seed=3, steps=3, first=2, count=2):
            assert_same(batches.next_step(), want)
    finally:
        batches.close()


def test_sharded_tokens_give_the_same_batches(tokens):
    sharded = ShardedTokens([tokens[:1234], tokens[1234:4000], tokens[4000:]])
    batches = loader(sharded, seed=5, background=True)
    try:
        for want in expected_steps(tokens, seed=5, steps=4):
            assert_same(batches.next_step(), want)
    finally:
        batches.close()


def test_drawing_ahead_does_not_change_what_a_resumed_run_draws(tokens):
    """After k steps the background loader has drawn step k+1 already; its generator_state is the state
    after k draws, and a loader started from it continues with exactly the batches of the first one."""
    first = loader(tokens, seed=11, background=True)
    reference = torch.Generator().manual_seed(11)
    for _ in range(3):
        first.next_step()
        torch.randint(len(tokens) - SEQ, (ACCUM * B,), generator=reference)
    assert not torch.equal(first.generator.get_state(), reference.get_state())  # it did draw ahead
    state = first.generator_state()
    assert torch.equal(state, reference.get_state())
    resumed = loader(tokens, seed=0, background=True, state=state)
    try:
        for _ in range(3):
            for (x, y), (rx, ry) in zip(first.next_step(), resumed.next_step(), strict=True):
                assert torch.equal(x, rx) and torch.equal(y, ry)
    finally:
        first.close()
        resumed.close()


def test_close_sets_the_generator_back_to_the_batches_used(tokens):
    batches = loader(tokens, seed=2, background=True)
    batches.next_step()
    used = batches.generator_state()
    batches.close()
    assert torch.equal(batches.generator.get_state(), used)
    assert torch.equal(batches.generator_state(), used)


def test_an_error_while_gathering_in_the_background_reaches_the_step(tokens):
    class Unreadable(np.ndarray):
        def __getitem__(self, key):
            raise OSError("Input/output error")

    batches = loader(tokens.view(Unreadable), seed=1, background=True)
    try:
        with pytest.raises(OSError, match="Input/output error"):
            batches.next_step()
    finally:
        batches.close()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda_rows_are_pinned_copied_without_blocking_and_equal(tokens):
    gen = torch.Generator().manual_seed(7)
    batches = BatchLoader(tokens, SEQ, B, ACCUM, (0, ACCUM), gen, torch.device("cuda"))
    assert batches.background and batches.pin
    try:
        pending = batches._pending
        for want in expected_steps(tokens, seed=7, steps=3):
            got = batches.next_step()
            assert all(x.is_cuda and y.is_cuda for x, y in got)
            assert_same([(x.cpu(), y.cpu()) for x, y in got], want)
            assert pending[0][1].result().is_pinned()  # the next step's rows, gathered ahead
    finally:
        batches.close()
