"""What one sequence has cached, bound into an ONNX Runtime IOBinding: one class per layout.

Every cache owns, per slot (one sequence; there is one slot today, and the leading axis
of every buffer is there so a later change can decode several sequences in one run):

    ids   (slots, capacity) int64   the tokens held, then the ones being fed this step
    mask  (slots, capacity) int64   1 over the held and fed positions, 0 after
    pos   (capacity,)       int64   position ids, for graphs that take them
    K, V  per layer, the layout's own buffers (below)

and the verbs every caller uses:

    stage(tokens)       put this step's new tokens after the held ones
    bind(binding, n)    bind the step's inputs (ids, mask, positions) and past/present
    advance(n, b)       after the run: the n staged tokens are now held
    rewind(n)           forget the last n tokens (rejected drafts, a stopped reply)
    trim_to(n)          keep the first n tokens (a shared prefix, a context that overflows)
    fork()              an independent copy of what is held (a prefix continued two ways)

SharedKVCache   (slots, kv_heads, capacity, head_dim) per layer and per K/V, bound as both
                past_key_values.{i}.* and present.{i}.*: the attention op appends in place,
                so nothing is copied or reallocated per token. Needs a graph whose manifest
                says KVLayout.SHARED (GroupQueryAttention).
ConcatKVCache   any graph with the standard I/O (optimum's too): present.{i}.* comes back as
                a new ORT-owned value, (slots, kv_heads, length, head_dim), and is bound as
                the next past. The graph never writes into a past, so a fork shares them.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import onnxruntime as ort

from . import contract as io
from .contract import KVLayout
from .session import GraphIO

ALIGN = 64  # bytes: ONNX Runtime's own allocator aligns to 64, numpy's malloc only to 16


def aligned_zeros(shape, dtype) -> np.ndarray:
    """np.zeros on a 64-byte boundary, as ORT's own buffers are: the kernels' AVX-512 loads
    from buffers bound by pointer (KV cache, ids, mask, logits) then never straddle cache
    lines. On SmolLM2 int4 it won 3 of 3 A/B pairs by ~3 % a decode step, which is inside
    this machine's run-to-run noise."""
    dtype = np.dtype(dtype)
    size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = np.zeros(size + ALIGN, np.uint8)
    start = (-raw.ctypes.data) % ALIGN
    return raw[start:start + size].view(dtype).reshape(shape)


def _grown(old: np.ndarray, capacity: int, keep: int) -> np.ndarray:
    """A zeroed aligned copy of `old` whose last axis is `capacity` long, its first `keep` kept."""
    new = aligned_zeros(old.shape[:-1] + (capacity,), old.dtype)
    new[..., :keep] = old[..., :keep]
    return new


class KVCache:
    """The layout-independent part: token ids, attention mask, positions, length."""

    slots = 1

    def __init__(self, gio: GraphIO, capacity: int, device: str = "cpu"):
        self.gio, self.device = gio, device
        self.length = 0  # tokens held
        self.ids = aligned_zeros((self.slots, capacity), np.int64)
        self.mask = aligned_zeros((self.slots, capacity), np.int64)
        self.pos = np.arange(capacity, dtype=np.int64)

    @property
    def capacity(self) -> int:
        return self.ids.shape[1]

    @property
    def tokens(self) -> np.ndarray:
        """(length,) int64 view of the tokens held."""
        return self.ids[0, : self.length]

    @property
    def nbytes(self) -> int:
        """What this cache allocates: ids, mask and every K/V buffer."""
        kv = sum(int(np.prod(v.shape())) for v in self._values.values()) * self.gio.kv_dtype.itemsize
        return self.ids.nbytes + self.mask.nbytes + kv

    def reserve(self, capacity: int) -> None:
        """Make room for `capacity` tokens, keeping what is held."""
        if capacity > self.capacity:
            self.ids = _grown(self.ids, capacity, self.length)
            self.mask = _grown(self.mask, capacity, self.length)
            self.pos = np.arange(capacity, dtype=np.int64)
            self._grow_kv(capacity)

    def stage(self, tokens: Sequence[int]) -> int:
        """Write this step's tokens after the held ones; returns how many."""
        n, start = len(tokens), self.length
        self.reserve(start + n)
        self.ids[0, start:start + n] = tokens
        self.mask[0, start:start + n] = 1
        return n

    def bind(self, binding: ort.IOBinding, n: int) -> None:
        """Bind a run over the n staged tokens: ids, mask, positions, pasts and presents."""
        start = self.length
        binding.bind_input(io.INPUT_IDS, "cpu", 0, np.int64, [1, n], self.ids[0, start:].ctypes.data)
        binding.bind_input(io.ATTENTION_MASK, "cpu", 0, np.int64, [1, self._mask_length(n)], self.mask.ctypes.data)
        if self.gio.has_position_ids:
            binding.bind_input(io.POSITION_IDS, "cpu", 0, np.int64, [1, n], self.pos[start:].ctypes.data)
        self._bind_kv(binding)

    def advance(self, n: int, binding: ort.IOBinding) -> None:
        """After the run: the n staged tokens are held."""
        self.length += n

    def rewind(self, n: int) -> None:
        """Forget the last n tokens."""
        if not 0 <= n <= self.length:
            raise ValueError(f"cannot rewind {n} of {self.length} tokens")
        self.trim_to(self.length - n)

    def trim_to(self, n: int) -> None:
        """Keep the first n tokens."""
        if not 0 <= n <= self.length:
            raise ValueError(f"cannot keep {n} of {self.length} tokens")
        self.mask[:, n:] = 0
        self._trim_kv(n)
        self.length = n

    def fork(self) -> "KVCache":
        """An independent cache holding the same tokens; either may go on alone."""
        twin = object.__new__(type(self))
        twin.gio, twin.device, twin.length = self.gio, self.device, self.length
        twin.ids, twin.mask, twin.pos = self.ids.copy(), self.mask.copy(), self.pos
        self._fork_kv(twin)
        return twin

    # ---- the layout's part ---------------------------------------------------------------
    def _mask_length(self, n: int) -> int:
        return self.length + n

    def _grow_kv(self, capacity: int) -> None:
        pass

    def _bind_kv(self, binding: ort.IOBinding) -> None:
        raise NotImplementedError

    def _trim_kv(self, n: int) -> None:
        pass

    def _fork_kv(self, twin: "KVCache") -> None:
        raise NotImplementedError

    def _ortvalue(self, arr: np.ndarray) -> ort.OrtValue:
        return ort.OrtValue.ortvalue_from_numpy(arr, self.device, 0)


class SharedKVCache(KVCache):
    """One (slots, kv_heads, capacity, head_dim) buffer per past name, written in place."""

    def __init__(self, gio: GraphIO, capacity: int, device: str = "cpu"):
        super().__init__(gio, capacity, device)
        shape = (self.slots, gio.num_kv_heads, capacity, gio.head_dim)
        self._set_buffers({past: aligned_zeros(shape, gio.kv_dtype) for past, _ in io.kv_names(gio.num_layers)})

    def _set_buffers(self, arrays: dict[str, np.ndarray]) -> None:
        # On CPU an OrtValue wraps the numpy memory itself; on CUDA it is a device copy.
        self._values = {past: self._ortvalue(a) for past, a in arrays.items()}
        self._arrays = arrays if self.device == "cpu" else None
        self._bound = False  # the binding must learn the new buffers

    def _array(self, past: str) -> np.ndarray:
        return self._arrays[past] if self._arrays is not None else self._values[past].numpy()

    def _mask_length(self, n: int) -> int:
        # Single-token steps see the whole (1, capacity) mask: the same shapes every step,
        # so ONNX Runtime plans its memory once instead of once per length.
        return self.capacity if n == 1 else self.length + n

    def _grow_kv(self, capacity: int) -> None:
        self._set_buffers({past: self._copy(self._array(past), capacity) for past in self._values})

    def _copy(self, src: np.ndarray, capacity: int) -> np.ndarray:
        """A new buffer of `capacity` positions holding src's first `length`."""
        new = aligned_zeros(src.shape[:2] + (capacity,) + src.shape[3:], src.dtype)
        new[:, :, : self.length] = src[:, :, : self.length]
        return new

    def _bind_kv(self, binding: ort.IOBinding) -> None:
        # The buffers stay bound between steps: rebinding 2 x layers values costs ~0.4 ms a token.
        if self._bound:
            return
        for past, present in io.kv_names(self.gio.num_layers):
            binding.bind_ortvalue_input(past, self._values[past])
            binding.bind_ortvalue_output(present, self._values[past])  # same memory: written in place
        self._bound = True

    # _trim_kv: nothing to do; positions past the length are masked out and overwritten.

    def _fork_kv(self, twin: KVCache) -> None:
        twin._set_buffers({past: self._copy(self._array(past), self.capacity) for past in self._values})


class ConcatKVCache(KVCache):
    """Per past name the ORT value of exactly `length` positions; presents are new values."""

    def __init__(self, gio: GraphIO, capacity: int, device: str = "cpu"):
        super().__init__(gio, capacity, device)
        empty = np.zeros((self.slots, gio.num_kv_heads, 0, gio.head_dim), gio.kv_dtype)
        self._values = {past: self._ortvalue(empty) for past, _ in io.kv_names(gio.num_layers)}

    def _bind_kv(self, binding: ort.IOBinding) -> None:
        for past, present in io.kv_names(self.gio.num_layers):
            binding.bind_ortvalue_input(past, self._values[past])
            binding.bind_output(present, self.device)

    def advance(self, n: int, binding: ort.IOBinding) -> None:
        presents = binding.get_outputs()[-2 * self.gio.num_layers:]  # bound last, in kv_names order
        self._values = {past: value for (past, _), value in zip(io.kv_names(self.gio.num_layers), presents)}
        self.length += n

    def _trim_kv(self, n: int) -> None:
        if n < self.length:
            self._values = {past: self._ortvalue(np.ascontiguousarray(v.numpy()[:, :, :n]))
                            for past, v in self._values.items()}

    def _fork_kv(self, twin: KVCache) -> None:
        twin._values = dict(self._values)  # read-only to the graph: shared until either side moves on


LAYOUTS: dict[KVLayout, type[KVCache]] = {KVLayout.SHARED: SharedKVCache, KVLayout.CONCAT: ConcatKVCache}


def make_cache(gio: GraphIO, layout: KVLayout, capacity: int, device: str = "cpu") -> KVCache:
    return LAYOUTS[layout](gio, capacity, device)
