"""`edgellama eval`: perplexity over a text, and agreement with a reference model.

Windows of `window` tokens advance by `stride` (default: the window, i.e. non-overlapping).
Each window is one uncached forward pass; the tokens it scores are those not scored by an
earlier window (all of them for the first), each predicted from what precedes it in the
window. No BOS is added unless the tokenizer adds one.

Memory: logits are written by onnxruntime straight into one reused (window, vocab) buffer
(an I/O binding), not allocated per run and copied out. Against a reference, `evaluate`
takes either two loaded models (both sessions resident, scored window by window), or
loaders (functions returning a Model): then the model is loaded, scored and its logits
spooled to a temporary file (tokens x vocab float32, read back a window at a time), and
freed before the reference is loaded, so one session is resident at a time
(SmolLM2-135M int4 against fp32 on GPL-3: 2.5 GB -> 1.0 GB peak, 1.5 GB of temporary
disk). Both ways give the same numbers, bit for bit.
"""

from __future__ import annotations

import gc
import tempfile
from dataclasses import dataclass
from typing import Callable, Sequence, Union

import numpy as np

from edgellama.runtime import contract as io
from edgellama.runtime.errors import BadArgumentError
from edgellama.runtime.model import Model


_ROWS = 64


@dataclass(frozen=True)
class EvalResult:
    perplexity: float
    tokens: int  # tokens scored
    kl: float | None = None  # mean KL(reference || model), nats per token
    top1_agreement: float | None = None  # share of positions with the same argmax

    def to_dict(self) -> dict:
        out = {"perplexity": self.perplexity, "tokens": self.tokens}
        if self.kl is not None:
            out.update(kl=self.kl, top1_agreement=self.top1_agreement)
        return out


ModelOrLoader = Union[Model, Callable[[], Model]]


def full_logits(model: Model, ids: Sequence[int], out: np.ndarray | None = None, past_capacity: int = 0
                ) -> np.ndarray:
    """(len(ids), vocab) float32 logits of one uncached pass (every position kept). `out`: a
    C-contiguous float32 buffer of at least that many rows for onnxruntime to write into
    (CPU, float32 logits); the returned array is then a view of it. `past_capacity`: the
    empty past given as zeros of that many positions (nothing of it is read: the mask covers
    only `ids`), for graphs that insist on a buffer of one attention window."""
    g = model.graph_io
    empty = np.zeros((1, g.num_kv_heads, past_capacity, g.head_dim), g.kv_dtype)
    feeds = {io.INPUT_IDS: np.asarray([ids], np.int64), io.ATTENTION_MASK: np.ones((1, len(ids)), np.int64)}
    if g.has_position_ids:
        feeds[io.POSITION_IDS] = np.arange(len(ids), dtype=np.int64)[None]
    for i in range(g.num_layers):
        feeds[io.past_key(i)] = feeds[io.past_value(i)] = empty
    feeds.update(g.keep(0))
    if out is not None and _can_bind(model, out):
        target = out[:len(ids)]
        binding = model.session.io_binding()
        for name, value in feeds.items():
            binding.bind_cpu_input(name, value)
        binding.bind_output(io.LOGITS, "cpu", 0, np.float32, [1, *target.shape], target.ctypes.data)
        model.session.run_with_iobinding(binding)
        return target
    return model.session.run([io.LOGITS], feeds)[0][0]


def _can_bind(model: Model, out: np.ndarray) -> bool:
    logits = next((o for o in model.session.get_outputs() if o.name == io.LOGITS), None)
    return (model.provider == "cpu" and logits is not None and logits.type == "tensor(float)"
            and out.dtype == np.float32 and out.ndim == 2 and out.flags.c_contiguous)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    x -= x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def windows(n_tokens: int, window: int, stride: int):
    """(start, end, first scored position) per window; positions are absolute."""
    start, scored_to = 0, 1  # the very first token has nothing to be predicted from
    while scored_to < n_tokens:
        end = min(start + window, n_tokens)
        yield start, end, max(scored_to, start + 1)
        scored_to = end
        if end == n_tokens:
            break
        start = end if stride >= window else start + stride


def evaluate(model: ModelOrLoader, text: str, window: int = 512, stride: int | None = None,
             reference: ModelOrLoader | None = None,
             progress: Callable[[int, int, str], None] = lambda d, t, w: None) -> EvalResult:
    """Perplexity of `model` over `text`, and KL / top-1 agreement against `reference`.
    Either may be a Model or a loader (a function returning one): with a loader for the
    reference, one session is resident at a time (see the module's docstring)."""
    stride = stride or window
    if window < 2 or stride < 1 or stride > window:
        raise BadArgumentError(f"window must be >= 2 and 1 <= stride <= window (got {window}, {stride})")
    if reference is not None and not isinstance(reference, Model):
        return _evaluate_in_turn(model, text, window, stride, reference, progress)
    model = model if isinstance(model, Model) else model()
    ids = _encode_checked(model, text, window)
    if reference is not None and reference.encode(text) != ids:
        raise BadArgumentError(_TOKENIZED_DIFFERENTLY)
    spans = list(windows(len(ids), window, stride))
    buffers = _Buffers(model, reference, window)
    acc = _Sums()
    progress(0, len(spans), "score:windows")
    for i, (start, end, first) in enumerate(spans):
        chunk = ids[start:end]
        rows = slice(first - start - 1, end - start - 1)  # the positions predicting first..end-1
        logits = full_logits(model, chunk, buffers.model)[rows]
        ref_logits = full_logits(reference, chunk, buffers.reference)[rows] if reference is not None else None
        acc.add(logits, ref_logits, np.asarray(ids[first:end]))
        progress(i + 1, len(spans), "score:windows")
    return acc.result(reference is not None)


_TOKENIZED_DIFFERENTLY = ("the reference model tokenizes the text differently; compare models with the same "
                          "tokenizer")


def _encode_checked(model: Model, text: str, window: int) -> list[int]:
    if window > model.context_length:
        raise BadArgumentError(f"window {window} is longer than the model's context {model.context_length}")
    ids = model.encode(text)
    if len(ids) < 2:
        raise BadArgumentError("the text has fewer than 2 tokens; nothing to score")
    return ids


class _Buffers:
    """One (window, vocab) float32 logits buffer per model, reused by every window."""

    def __init__(self, model: Model, reference: Model | None, window: int):
        self.model = _buffer(model, window)
        self.reference = None if reference is None else _buffer(reference, window)


def _buffer(model: Model, window: int) -> np.ndarray | None:
    vocab = model.graph_io.vocab_size
    out = None if vocab is None else np.empty((window, vocab), np.float32)
    return out if out is not None and _can_bind(model, out) else None


class _Sums:
    """Negative log-likelihood, KL and agreement, summed in the same order however the
    logits arrive."""

    def __init__(self):
        self.nll, self.kl, self.agree, self.count = 0.0, 0.0, 0, 0

    def add(self, logits: np.ndarray | Callable[[int, int], np.ndarray], ref_logits: np.ndarray | None,
            targets: np.ndarray, nll: bool = True, divergence: bool = True) -> None:
        """logits: the model's (rows, vocab), or a function giving its rows [r0, r1)."""
        rows = logits if callable(logits) else lambda r0, r1: logits[r0:r1]
        for r in range(0, len(targets), _ROWS):  # float64 on a few rows at a time: memory stays small
            logp = log_softmax(rows(r, r + _ROWS))
            if nll:
                self.nll -= logp[np.arange(len(logp)), targets[r:r + _ROWS]].sum()
            if ref_logits is not None and divergence:
                ref = log_softmax(ref_logits[r:r + _ROWS])
                self.kl += float((np.exp(ref) * (ref - logp)).sum())
                self.agree += int((ref.argmax(-1) == logp.argmax(-1)).sum())
        if nll:
            self.count += len(targets)

    def result(self, with_reference: bool) -> EvalResult:
        ppl = float(np.exp(self.nll / self.count))
        if not with_reference:
            return EvalResult(ppl, self.count)
        return EvalResult(ppl, self.count, self.kl / self.count, self.agree / self.count)


def _release_memory() -> None:
    """Collect garbage and hand freed heap back to the system (glibc keeps a freed session's
    memory otherwise: SmolLM2 int4, 0.2 GB)."""
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


def _evaluate_in_turn(model: ModelOrLoader, text: str, window: int, stride: int, reference: Callable[[], Model],
                      progress: Callable[[int, int, str], None]) -> EvalResult:
    """The model's windows first, its scored logits spooled to a temporary file; the model
    freed (when loaded here); then the reference's windows against the spooled logits."""
    model = model if isinstance(model, Model) else model()
    ids = _encode_checked(model, text, window)
    spans = list(windows(len(ids), window, stride))
    total = 2 * len(spans)
    acc = _Sums()
    progress(0, total, "score:windows")
    with tempfile.TemporaryFile(prefix="edgellama-eval-") as spool:
        buffer = _buffer(model, window)
        for i, (start, end, first) in enumerate(spans):
            logits = np.ascontiguousarray(full_logits(model, ids[start:end], buffer)[first - start - 1:end - start - 1],
                                          np.float32)
            logits.tofile(spool)
            acc.add(logits, None, np.asarray(ids[first:end]), divergence=False)
            progress(i + 1, total, "score:windows")
        vocab = logits.shape[-1]
        del model, buffer, logits
        _release_memory()  # the model's session goes before the reference's is built
        ref_model = reference()
        if ref_model.encode(text) != ids:
            raise BadArgumentError(_TOKENIZED_DIFFERENTLY)
        buffer = _buffer(ref_model, window)
        spool.seek(0)
        for i, (start, end, first) in enumerate(spans):
            ref_logits = full_logits(ref_model, ids[start:end], buffer)[first - start - 1:end - start - 1]
            if ref_logits.shape[-1] != vocab:
                raise BadArgumentError(f"the reference has {ref_logits.shape[-1]} logits a position, the model "
                                       f"{vocab}; compare models with the same vocabulary")
            at = spool.tell()

            def spooled(r0: int, r1: int, at=at, n=end - first) -> np.ndarray:  # a few rows at a time
                r1 = min(r1, n)
                spool.seek(at + r0 * vocab * 4)
                return np.fromfile(spool, np.float32, (r1 - r0) * vocab).reshape(r1 - r0, vocab)

            acc.add(spooled, ref_logits, np.asarray(ids[first:end]), nll=False)
            spool.seek(at + (end - first) * vocab * 4)
            progress(len(spans) + i + 1, total, "score:windows")
    return acc.result(True)
