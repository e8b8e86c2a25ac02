"""A split stored as several token shards, read as one array: ``len`` and slicing, shard boundaries hidden.

Each shard is a read-only memmap, so opening a 10B-token split costs no memory; a slice that crosses
a boundary is the concatenation of its pieces. Training's samplers and the checks of
:class:`gpt2lab.data.TokenData` only slice, so they read shards as they read a single ``train.bin``.
"""

from __future__ import annotations

import numpy as np


class ShardedTokens:
    def __init__(self, parts: list[np.ndarray]) -> None:
        self.parts = parts  # (n_shards,) read-only memmaps, in order
        self.dtype = parts[0].dtype
        self.starts = np.cumsum([0] + [len(p) for p in self.parts])  # (n_shards + 1,) first index of each

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, key: slice) -> np.ndarray:
        if not isinstance(key, slice) or key.step not in (None, 1):
            raise TypeError("sharded tokens are read by contiguous slices")
        start, stop, _ = key.indices(len(self))
        if stop <= start:
            return np.empty(0, dtype=self.dtype)
        first = int(np.searchsorted(self.starts, start, side="right")) - 1
        pieces = []
        while start < stop:
            base = int(self.starts[first])
            end = min(stop, int(self.starts[first + 1]))
            pieces.append(self.parts[first][start - base : end - base])
            start, first = end, first + 1
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        whole = self[:]
        return whole if dtype is None else whole.astype(dtype)
