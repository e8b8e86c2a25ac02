"""The KV cache of one attention layer, for incremental decoding.

``window=None``: a buffer of ``capacity`` slots filled left to right.
``window=W``: a ring of W slots; the token at sequence index p lives in slot p % W, so memory stays
constant however long the generation runs. Keys are stored after RoPE, so a slot's order in the ring
does not matter: masks are built from the sequence index stored with each slot.

Everything the attention layer needs to choose its path (how many tokens are stored, whether any is
padding) is kept on the host, so a decoding step never waits for the device to answer a question.

Compiled decoding (:mod:`gpt2lab.kernels.compiled_decoding`) calls :meth:`GPT.decode_step` with the next
token's sequence index as a tensor: attention passes it to :meth:`write_at`, which writes there and returns
the whole buffers, so every step has the same shapes and reads nothing from the host, and one compiled
graph serves them all. The decoder, not the cache, advances ``length`` after such a step.
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(
        self,
        batch: int,
        n_kv_head: int,
        head_dim: int,
        capacity: int,
        window: int | None,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        size = capacity if window is None else min(window, capacity)
        self.window = window
        self.k = torch.zeros(batch, n_kv_head, size, head_dim, dtype=dtype, device=device)  # (B, nkv, slots, hs)
        self.v = torch.zeros_like(self.k)
        # The sequence index of each slot (-1: empty in a ring). A linear buffer's slot i always holds token i,
        # so its index is written once here, and a decoding step only copies its keys and values.
        if window is None:
            self.key_index = torch.arange(size, device=device)
        else:
            self.key_index = torch.full((size,), -1, dtype=torch.long, device=device)
        self.key_valid = torch.ones(batch, size, dtype=torch.bool, device=device)  # False: a padding token
        self.length = 0  # tokens written so far = sequence index of the next token
        self.has_padding = False  # whether any stored token is padding (then key_valid must be applied)

    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.k, self.v))

    def _write(self, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor | None) -> None:
        T = k.shape[2]
        start = self.length
        if self.window is None:  # slot i holds token i: its index and validity (True) are preset
            if start + T > self.capacity:
                raise RuntimeError(f"KV cache is full ({self.capacity} tokens)")
            slots = slice(start, start + T)
            if valid is not None:
                self.key_valid[:, slots] = valid
        else:
            keep = min(T, self.capacity)  # only the last W tokens can ever be attended again
            k, v = k[:, :, T - keep :], v[:, :, T - keep :]
            valid = None if valid is None else valid[:, T - keep :]
            index = torch.arange(start + T - keep, start + T, device=k.device)
            slots = index % self.capacity
            self.key_index[slots] = index
            self.key_valid[:, slots] = True if valid is None else valid
        self.k[:, :, slots] = k
        self.v[:, :, slots] = v
        self.length += T

    def write_at(self, k: torch.Tensor, v: torch.Tensor, index: torch.Tensor):
        """Store one new token's (B, nkv, 1, hs) key/value at sequence ``index`` (a (1,) tensor), with shapes
        that never change: return every slot, ``(keys, values, key_index, key_valid)``, for a mask to select from.

        Only tensors change, so this runs inside a compiled graph; the caller advances ``length`` afterwards.
        """
        slot = index % self.capacity  # a ring's slot; a linear buffer's slot is the index itself
        self.k.index_copy_(2, slot, k)
        self.v.index_copy_(2, slot, v)
        if self.window is not None:  # a linear buffer's indices and validity are preset
            self.key_index.index_copy_(0, slot, index)
            self.key_valid.index_fill_(1, slot, True)
        return self.k, self.v, self.key_index, self.key_valid

    def update(self, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor | None):
        """Store the new (B, nkv, T, hs) keys/values; return what the new queries attend to.

        ``valid`` (B, T) marks real tokens; passing one at all records that the batch is padded.
        Returns ``(keys, values, key_index, key_valid)``: the stored entries, the new ones included (or
        appended, when a multi-token step into a ring would overwrite slots its own queries still need).
        Every returned entry is filled, so after a one-token step all of them are visible to the query.
        """
        self.has_padding = self.has_padding or valid is not None
        T = k.shape[2]
        if self.window is None or T == 1:
            self._write(k, v, valid)
            n = min(self.length, self.capacity)
            return self.k[:, :, :n], self.v[:, :, :n], self.key_index[:n], self.key_valid[:, :n]
        new_index = torch.arange(self.length, self.length + T, device=k.device)
        new_valid = torch.ones(k.shape[0], T, dtype=torch.bool, device=k.device) if valid is None else valid
        out = (
            torch.cat((self.k, k), dim=2),
            torch.cat((self.v, v), dim=2),
            torch.cat((self.key_index, new_index)),
            torch.cat((self.key_valid, new_valid), dim=1),
        )
        self._write(k, v, valid)
        return out
