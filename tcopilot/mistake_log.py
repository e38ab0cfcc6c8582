"""The Mistake Log as a stored artifact: a bounded, compressed replay buffer of the Pilot's errors.

The paper (Algorithm 1) keeps the Mistake Log of the last R training steps (R = 128) and trains the Copilot
on samples from it. Stored naively that is ``[tokens x V]`` errors plus ``[tokens x d]`` states of every
layer, far too large; DESIGN.md 4.4 compresses it to what the Copilot needs per token:

================  ==============================  ==================================================
field             shape / dtype                   what
================  ==============================  ==================================================
``input_ids``     ``[B, L]`` int32                 the Pilot's input tokens (``X~`` is recomputed
                                                   from them through the Pilot's embedding)
``attention_mask````[B, L]`` bool                  real tokens; positions follow from it
``targets``       ``[B, L]`` int32                 label of each position (already shifted: position
                                                   t predicts ``targets[t]``), ``ignore_index`` if none
``lse``           ``[Nc]`` fp32                    log-sum-exp of the logits, counted rows only
``p_target``      ``[Nc]`` fp32                    ``p(y)``, counted rows only (exact error mass)
``topk_ids``      ``[Nc, K]`` int32                the K largest logits' ids, descending
``topk_logp``     ``[Nc, K]`` ``topk_dtype``       their log-probabilities ``z - lse``
``pooled``        ``[Nr, d]`` bf16 / int8 / fp32   mean of the decoder layers' outputs, real rows only
``pooled_scale``  ``[Nr]`` fp32 (int8 only)        per-row scale: ``pooled ~= q * scale``
================  ==============================  ==================================================

``Nc`` = counted rows (``targets != ignore_index``), ``Nr`` = real rows (``attention_mask == 1``), both in
row-major order of ``[B, L]``: padding and prompt positions cost only their ids.

The rebuilt error of a counted row is ``ell^ = onehot(y) - sum_j p_j e_{id_j}`` with
``p_j = exp(topk_logp_j)`` (:func:`sparse_errors`); the probability outside the K ids, ``1 - sum_j p_j``
(:func:`residual_mass`), is the approximation's error budget and is recorded per step. Nothing here needs a
second pass over the vocabulary: the capture returns ``lse`` and the top-k in its one pass.

Besides the buffer (evicted oldest first), a :class:`MistakeLog` keeps a small *summary* of every step it
ever saw, which is never evicted: per step the counted tokens and sums of the error mass ``1 - p(y)``
(``= ||ell||_1 / 2``), of ``||ell||^2``, of the token loss and of the residual mass; per label id the
count and summed error mass; and the counts of (label -> top-1 prediction) confusions. ``tcopilot
inspect`` reads it.
"""

from __future__ import annotations

import json
import os
import warnings
from collections import OrderedDict
from dataclasses import dataclass

import torch

from tcopilot._validation import check_bool, check_choice, check_int

POOLED_DTYPES = ("bfloat16", "float16", "int8", "float32")
TOPK_DTYPES = ("float32", "float16", "bfloat16")
INDEX_NAME = "mistake_log.json"
SUMMARY_NAME = "summary.safetensors"
FORMAT = "tcopilot.mistake_log"
FORMAT_VERSION = 1
# History columns of the per-step summary.
HISTORY_COLUMNS = ("step", "tokens", "err_mass", "err_sq", "nll", "residual")


# ---------------------------------------------------------------------------------------------- math helpers
def residual_mass(lse: torch.Tensor, topk_logits: torch.Tensor) -> torch.Tensor:
    """Probability outside the top-k ids: ``1 - sum_j exp(topk_logits_j - lse)``, ``[N]`` fp32, clamped >= 0.

    Computed from the capture's own ``lse`` and top-k logits, so no second pass over the vocabulary.
    """
    mass = torch.exp(topk_logits.float() - lse.float()[:, None]).sum(dim=1)
    return (1.0 - mass).clamp(min=0.0)


def sparse_errors(targets: torch.Tensor, topk_ids: torch.Tensor, topk_logp: torch.Tensor):
    """The rebuilt error ``ell^ = onehot(y) - p^_topk`` of counted rows in sparse form.

    Args:
        targets: ``[Nc]`` label ids (counted rows only).
        topk_ids: ``[Nc, K]`` ids; ``topk_logp``: ``[Nc, K]`` their log-probabilities.

    Returns:
        ``(ids [Nc, K+1] int64, coef [Nc, K+1] fp32, ell_sq [Nc] fp32)`` with
        ``ell^_i = sum_m coef[i, m] * e_{ids[i, m]}`` (column 0 is the label with coefficient 1; an id may
        occur twice, the coefficients then add) and ``ell_sq = ||ell^_i||^2 = 1 - 2 p^(y) + sum_j p_j^2``.
    """
    y = targets.long()
    ids = torch.cat([y[:, None], topk_ids.long()], dim=1)
    p = torch.exp(topk_logp.float())
    coef = torch.cat([torch.ones_like(p[:, :1]), -p], dim=1)
    p_y = (p * (topk_ids.long() == y[:, None])).sum(dim=1)
    ell_sq = 1.0 - 2.0 * p_y + (p * p).sum(dim=1)
    return ids, coef, ell_sq


def dense_errors(targets: torch.Tensor, topk_ids: torch.Tensor, topk_logp: torch.Tensor, vocab_size: int):
    """``ell^`` materialised as ``[Nc, V]`` fp32 (tests and small-vocabulary inspection only)."""
    ids, coef, _ = sparse_errors(targets, topk_ids, topk_logp)
    out = torch.zeros(ids.shape[0], vocab_size, dtype=torch.float32, device=ids.device)
    return out.scatter_add_(1, ids, coef)


def quantise_rows(x: torch.Tensor, dtype: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``[N, d]`` float rows -> ``(q, scale)``: bf16/fp16/fp32 casts (``scale=None``), or int8 with a per-row
    fp32 scale ``max|x_row| / 127`` (round to nearest; all-zero rows get scale 0)."""
    if dtype == "int8":
        xf = x.float()
        scale = xf.abs().amax(dim=1) / 127.0
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        q = torch.round(xf / safe[:, None]).clamp_(-127, 127).to(torch.int8)
        return q, scale
    return x.to(getattr(torch, dtype)), None


def dequantise_rows(q: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """Inverse of :func:`quantise_rows`, fp32."""
    if scale is None:
        return q.float()
    return q.float() * scale.float()[:, None]


# ---------------------------------------------------------------------------------------------- one entry
@dataclass
class LogEntry:
    """One stored forward of the Pilot (one optimisation step without gradient accumulation).

    See the module docstring for the fields. All tensors live on one device (CPU in the buffer; the
    device passed to :meth:`MistakeLog.sample` afterwards).
    """

    step: int
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    targets: torch.Tensor
    lse: torch.Tensor
    p_target: torch.Tensor
    topk_ids: torch.Tensor
    topk_logp: torch.Tensor
    pooled: torch.Tensor | None = None
    pooled_scale: torch.Tensor | None = None

    TENSOR_FIELDS = ("input_ids", "attention_mask", "targets", "lse", "p_target", "topk_ids", "topk_logp",
                     "pooled", "pooled_scale")

    def tensors(self) -> dict[str, torch.Tensor]:
        return {k: getattr(self, k) for k in self.TENSOR_FIELDS if getattr(self, k) is not None}

    @property
    def nbytes(self) -> int:
        """Bytes of tensor payload (what ``max_bytes`` bounds)."""
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    @property
    def num_tokens(self) -> int:
        """Real (non-padding) tokens of the entry."""
        return int(self.attention_mask.sum())

    def to(self, device, non_blocking: bool = False) -> LogEntry:
        kw = {k: t.to(device, non_blocking=non_blocking) for k, t in self.tensors().items()}
        return LogEntry(step=self.step, **kw)

    def counted(self, ignore_index: int = -100) -> torch.Tensor:
        """``[B*L]`` bool: rows with a label (the rows of ``lse``, ``topk_*``)."""
        return self.targets.reshape(-1) != ignore_index

    def counted_rows(self, ignore_index: int = -100) -> torch.Tensor:
        """``[Nc]`` int64 indices of the counted rows in ``[B*L]``, ascending. Their number is the length of
        ``lse``, so no host read is needed (``torch.nonzero_static``): an entry on an accelerator is used
        without a synchronisation."""
        return torch.nonzero_static(self.counted(ignore_index), size=self.lse.shape[0]).squeeze(1)

    def pooled_states(self, dtype=torch.float32) -> torch.Tensor:
        """``[B, L, d]`` dequantised pooled states, zeros at padding (no host read)."""
        if self.pooled is None:
            raise ValueError("entry: this log stores no pooled states (pooled_dtype=None)")
        b, length = self.input_ids.shape
        rows = dequantise_rows(self.pooled, self.pooled_scale)
        out = torch.zeros(b * length, rows.shape[1], dtype=torch.float32, device=rows.device)
        real = torch.nonzero_static(self.attention_mask.reshape(-1), size=rows.shape[0]).squeeze(1)
        out.index_copy_(0, real, rows)
        return out.view(b, length, -1).to(dtype)

    def sparse_errors(self, ignore_index: int = -100):
        """``(counted [B*L] bool, ids [Nc, K+1], coef [Nc, K+1], ell_sq [Nc])``; see :func:`sparse_errors`.
        No host read."""
        counted = self.counted(ignore_index)
        y = self.targets.reshape(-1).index_select(0, self.counted_rows(ignore_index))
        return (counted, *sparse_errors(y, self.topk_ids, self.topk_logp))

    def residual_mass(self) -> torch.Tensor:
        """``[Nc]`` probability outside the kept ids."""
        return (1.0 - torch.exp(self.topk_logp.float()).sum(dim=1)).clamp(min=0.0)


# ---------------------------------------------------------------------------------------------- the buffer
class MistakeLog:
    """Bounded replay buffer of the Pilot's compressed Mistake Log (paper Algorithm 1; DESIGN.md 4.4).

    Args:
        capacity: the number of entries kept (R; the paper's 128). An entry is one Pilot forward: one
            optimisation step, or one micro-batch with gradient accumulation (the
            :class:`~tcopilot.train.Trainer` then sizes ``capacity = R * grad_accum``).
        max_bytes: upper bound on the stored tensor payload; pushing evicts the oldest entries until the
            buffer fits. An entry larger than ``max_bytes`` on its own is not stored (counted in
            ``dropped``, with a warning). ``usage()`` reports the numbers.
        topk: K, the number of Pilot logits kept per counted token (32 by default).
        pooled_dtype: storage of the pooled Pilot state: ``"bfloat16"`` (default), ``"float16"``,
            ``"int8"`` (per-row fp32 scale), ``"float32"`` (exact), or ``None`` (not stored).
        topk_dtype: storage of the top-k log-probabilities (``"float32"`` default, or ``"float16"``,
            ``"bfloat16"``).
        seed: seed of the sampling generator (its state is part of :meth:`state_dict`).
        pin_memory: keep entries in pinned CPU memory and copy device -> host with ``non_blocking=True``
            (default: when CUDA is available).
        ignore_index: the label of uncounted positions (prompt, padding) in the stored ``targets``: such rows
            keep only their ids, no statistics; a push with another ``ignore_index`` is relabelled to this one.

    The buffer is CPU-resident. On CUDA, pushing queues asynchronous copies into pinned memory and records
    an event; anything that reads an entry on the host waits for that event, and :meth:`sample` copies back
    asynchronously (stream-ordered after the device -> host copy). The summary is accumulated on the device
    and folded into host counters lazily (:meth:`flush`: one device -> host copy of everything pending), so a
    push synchronises only to read its entry's sizes (counted and real rows), and not at all when given them
    (``counts=``, as :class:`~tcopilot.TransformerCopilot` does), except that the ``MAX_PENDING``-th (64) push
    not yet folded in flushes, to bound the device memory of the pending per-token statistics: one
    synchronisation per 64 steps when nothing reads the statistics in between (:meth:`step_stats`, as logging
    does, flushes). An entry on the device is read without a
    synchronisation too: its rows are placed by indices sized from its shapes (:meth:`LogEntry.counted_rows`).
    """

    MAX_PENDING = 64  # pushes whose statistics wait on the device for the next flush, at most

    def __init__(self, capacity: int = 128, max_bytes: int = 1 << 30, topk: int = 32,
                 pooled_dtype: str | None = "bfloat16", topk_dtype: str = "float32", seed: int = 0,
                 pin_memory: bool | None = None, ignore_index: int = -100):
        # Python and numpy ints (numbers.Integral, not bools), stored as Python ints (the config is saved as JSON).
        capacity = check_int("capacity", capacity, low=1, what="an int >= 1")
        max_bytes = check_int("max_bytes", max_bytes, low=1, what="an int >= 1")
        topk = check_int("topk", topk, low=1, what="an int >= 1")
        # torch.Generator.manual_seed takes any int in [-2**63, 2**64)
        seed = check_int("seed", seed, low=-(2**63), high=2**64 - 1, what="an int in [-2**63, 2**64)")
        ignore_index = check_int("ignore_index", ignore_index, what="an int (within int64)")
        if pooled_dtype is not None:
            check_choice("pooled_dtype", pooled_dtype, POOLED_DTYPES)
        check_choice("topk_dtype", topk_dtype, TOPK_DTYPES)
        if pin_memory is not None:
            check_bool("pin_memory", pin_memory, "a bool or None")
        self.capacity, self.max_bytes, self.topk = capacity, max_bytes, topk
        self.pooled_dtype, self.topk_dtype = str(pooled_dtype) if pooled_dtype is not None else None, str(topk_dtype)
        self.seed, self.ignore_index = seed, ignore_index
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else bool(pin_memory)
        self.generator = torch.Generator().manual_seed(seed)
        self.entries: list[LogEntry] = []
        self._events: dict[int, object] = {}
        self.nbytes = 0
        self.evicted = 0
        self.dropped = 0
        self.pushed = 0
        self.next_step: int | None = None  # set by the Trainer: the step the next push belongs to
        # Summary (never evicted).
        self.vocab_size = 0
        self.history: OrderedDict[int, list[float]] = OrderedDict()
        self.token_count = torch.zeros(0, dtype=torch.int64)
        self.token_err = torch.zeros(0, dtype=torch.float64)
        self.confusions: dict[tuple[int, int], int] = {}
        self._pending: list[dict] = []

    # ------------------------------------------------------------------ configuration
    def config(self) -> dict:
        return {"capacity": self.capacity, "max_bytes": self.max_bytes, "topk": self.topk,
                "pooled_dtype": self.pooled_dtype, "topk_dtype": self.topk_dtype, "seed": self.seed,
                "ignore_index": self.ignore_index}

    def __len__(self) -> int:
        return len(self.entries)

    def __repr__(self) -> str:
        u = self.usage()
        return (f"MistakeLog({u['entries']}/{self.capacity} entries, "
                f"{u['bytes']:,}/{self.max_bytes:,} bytes, "
                f"topk={self.topk}, pooled={self.pooled_dtype})")

    def usage(self) -> dict:
        """Entries, bytes used, the budget, bytes per real token, evicted and dropped entries."""
        self._wait_all()  # the token counts read the entries' masks: their copies into pinned memory must be done
        toks = sum(e.num_tokens for e in self.entries)
        return {"entries": len(self.entries), "capacity": self.capacity, "bytes": self.nbytes,
                "max_bytes": self.max_bytes, "tokens": toks,
                "bytes_per_token": self.nbytes / toks if toks else 0.0,
                "evicted": self.evicted, "dropped": self.dropped, "pushed": self.pushed}

    # ------------------------------------------------------------------ writing
    def _to_host(self, t: torch.Tensor) -> torch.Tensor:
        t = t.detach()
        if t.device.type == "cpu":
            return t.contiguous().clone()
        if self.pin_memory:
            dst = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            return dst.copy_(t, non_blocking=True)
        return t.to("cpu")

    @torch.no_grad()
    def push(self, *, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, targets: torch.Tensor,
             capture, pooled: torch.Tensor | None = None, step: int | None = None,
             vocab_size: int | None = None, ignore_index: int | None = None,
             counts: tuple[int, int] | None = None) -> bool:
        """Compress one Pilot forward into an entry and append it (evicting the oldest as needed).

        The entry's sizes (counted and real rows) depend on the values: a push reads them from the device in one
        host read (one synchronisation on an accelerator), or not at all when the caller passes ``counts``
        (:class:`~tcopilot.TransformerCopilot` reads them with its input check). The rows are then gathered
        with fixed-size indices (``torch.nonzero_static``) and everything else stays on the device or travels in
        asynchronous copies (see the class docstring).

        Args:
            input_ids, attention_mask: ``[B, L]`` the Pilot's inputs (mask ``None`` = all real).
            targets: ``[B, L]`` or ``[B*L]`` shifted labels (position t predicts ``targets[t]``).
            capture: the :class:`~tcopilot.Capture` of the same ``B*L`` rows, computed with ``topk >= 1``
                (``min(self.topk, V)`` ids are kept).
            pooled: ``[B, L, d]`` pooled Pilot states (required unless ``pooled_dtype is None``).
            step: the training step (default ``next_step`` when set, else one past the last push).
            vocab_size: V, for the per-token summary (default: one past the largest id seen).
            ignore_index: the label of uncounted positions in ``targets`` (default this log's; stored
                targets always use this log's ``ignore_index``).
            counts: ``(counted rows, real rows)`` when the caller has read them already: the number of
                ``targets`` other than ``ignore_index`` (after relabelling to this log's) and of non-zero
                ``attention_mask`` entries. Not checked (that would be the read it saves): wrong counts store
                wrong rows.

        Returns:
            ``True`` when stored; ``False`` when the entry alone exceeds ``max_bytes`` (``dropped``).
        """
        if ignore_index is not None:
            ignore_index = check_int("ignore_index", ignore_index, what="an int (within int64) or None")
        if step is not None:
            step = check_int("step", step, what="an int or None")
        b, length = input_ids.shape
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        mask = attention_mask.reshape(b, length) != 0
        tgt = targets.reshape(b, length)
        if ignore_index is not None and ignore_index != self.ignore_index:
            tgt = tgt.masked_fill(tgt == ignore_index, self.ignore_index)
        flat_t = tgt.reshape(-1)
        counted = flat_t != self.ignore_index
        if capture.topk_ids is None or capture.topk_logits is None:
            raise ValueError("capture: expected a capture computed with topk >= 1 (topk_ids is None)")
        k = min(self.topk, capture.topk_ids.shape[1])
        if capture.lse.shape[0] != b * length:
            raise ValueError(f"capture: expected {b * length} rows (input_ids {b}x{length}), "
                             f"got {capture.lse.shape[0]}")
        if self.pooled_dtype is not None and pooled is None:
            raise ValueError(f"pooled: expected [B, L, d] pooled states (pooled_dtype={self.pooled_dtype!r})")
        if step is None:
            step = self.next_step if self.next_step is not None else (self._last_step() + 1)
        if counts is None:
            counts = torch.stack([counted.sum(), mask.sum()]).tolist()  # the one host read of a push
        n_counted, n_real = counts
        # Row indices of a known size: no host read (a boolean mask index would read its size back each time).
        rows_c = torch.nonzero_static(counted, size=n_counted).squeeze(1)
        lse = capture.lse.detach().index_select(0, rows_c).float()
        ids = capture.topk_ids.detach()[:, :k].index_select(0, rows_c)
        logp = capture.topk_logits.detach()[:, :k].index_select(0, rows_c).float() - lse[:, None]
        p_t = capture.p_target.detach().index_select(0, rows_c).float()
        sq = capture.p_sq_sum.detach().index_select(0, rows_c).float()
        q = scale = None
        if self.pooled_dtype is not None:
            rows_r = torch.nonzero_static(mask.reshape(-1), size=n_real).squeeze(1)
            q, scale = quantise_rows(pooled.detach().reshape(b * length, -1).index_select(0, rows_r),
                                     self.pooled_dtype)

        self._summarise(int(step), flat_t.index_select(0, rows_c), p_t, sq, lse, ids, logp, vocab_size)

        entry = LogEntry(
            step=int(step),
            input_ids=self._to_host(input_ids.to(torch.int32)),
            attention_mask=self._to_host(mask),
            targets=self._to_host(tgt.to(torch.int32)),
            lse=self._to_host(lse),
            p_target=self._to_host(p_t),
            topk_ids=self._to_host(ids.to(torch.int32)),
            topk_logp=self._to_host(logp.to(getattr(torch, self.topk_dtype))),
            pooled=None if q is None else self._to_host(q),
            pooled_scale=None if scale is None else self._to_host(scale),
        )
        if input_ids.device.type == "cuda" and self.pin_memory:
            ev = torch.cuda.Event()
            ev.record(torch.cuda.current_stream(input_ids.device))  # the copies' stream, not the current device's
            self._events[id(entry)] = ev
        self.pushed += 1
        size = entry.nbytes
        if size > self.max_bytes:
            self.dropped += 1
            self._events.pop(id(entry), None)
            warnings.warn(f"MistakeLog: an entry of {size:,} bytes exceeds max_bytes={self.max_bytes:,}; "
                          "not stored (raise max_bytes or lower topk / use pooled_dtype='int8')",
                          stacklevel=2)
            return False
        self.entries.append(entry)
        self.nbytes += size
        while len(self.entries) > self.capacity or self.nbytes > self.max_bytes:
            self._evict_oldest()
        return True

    def _evict_oldest(self) -> None:
        old = self.entries.pop(0)
        self._events.pop(id(old), None)
        self.nbytes -= old.nbytes
        self.evicted += 1

    def _last_step(self) -> int:
        last = 0
        if self.history:
            last = next(reversed(self.history))
        for p in self._pending:
            last = max(last, p["step"])
        return last

    def _wait(self, entry: LogEntry) -> None:
        ev = self._events.pop(id(entry), None)
        if ev is not None:
            ev.synchronize()

    # ------------------------------------------------------------------ summary
    def _summarise(self, step, y, p_t, sq, lse, ids, logp, vocab_size) -> None:
        """Queue one push's statistics, on the device (no host read); :meth:`flush` folds them in. The top-1
        predictions stay whole: the confusions (top-1 != label) are picked on the host, in :meth:`flush`."""
        err = 1.0 - p_t
        # contiguous: a copy of the column, not a view that would keep the whole [Nc, K] ids alive until the flush
        top1 = ids[:, 0].long().contiguous() if ids.shape[1] else torch.full_like(y, -1, dtype=torch.long)
        self._pending.append({
            "step": step,
            "vocab": vocab_size,
            "stats": torch.stack([
                # filled on the device (torch.tensor would copy a host value over, which waits for the device)
                torch.full((), float(y.numel()), dtype=torch.get_default_dtype(), device=err.device),
                err.sum(), (1.0 - 2.0 * p_t + sq).sum(),
                -torch.log(p_t.clamp(min=1e-38)).sum(),
                (1.0 - torch.exp(logp).sum(dim=1)).clamp(min=0).sum(),
            ]).double(),
            "y": y.long(), "err": err.double(), "top1": top1,
        })
        if len(self._pending) >= self.MAX_PENDING:
            self.flush()

    @staticmethod
    def _pending_on_host(pending: list[dict]) -> list[tuple[torch.Tensor, ...]]:
        """``(y, top1, err, stats)`` CPU tensors of each pending push, copied in one device -> host transfer per
        device: everything packed into one int64 tensor (the float64 values as their bits), split on the host."""
        out: list = [None] * len(pending)
        by_device: dict[torch.device, list[int]] = {}
        for i, p in enumerate(pending):
            by_device.setdefault(p["y"].device, []).append(i)
        for members in by_device.values():
            parts = []
            for i in members:
                p = pending[i]
                parts += [p["y"], p["top1"], p["err"].view(torch.int64), p["stats"].view(torch.int64)]
            flat = torch.cat(parts).cpu()
            start = 0
            for i in members:
                n = pending[i]["y"].shape[0]
                y, top1, err, stats = flat[start : start + 3 * n + 5].split([n, n, n, 5])
                out[i] = (y, top1, err.view(torch.float64), stats.view(torch.float64))
                start += 3 * n + 5
        return out

    def flush(self) -> None:
        """Fold pending per-push statistics into the host-side summary (one device -> host copy, a synchronisation
        on CUDA)."""
        for p, (y, top1, err, stats) in zip(self._pending, self._pending_on_host(self._pending)):
            wrong = top1 != y
            pairs = torch.stack([y[wrong], top1[wrong]], dim=1)
            vocab = max(self.vocab_size, p["vocab"] or 0, int(y.max()) + 1 if y.numel() else 0,
                        int(pairs.max()) + 1 if pairs.numel() else 0)
            if vocab > self.vocab_size:
                grow = vocab - self.vocab_size
                self.token_count = torch.cat([self.token_count, torch.zeros(grow, dtype=torch.int64)])
                self.token_err = torch.cat([self.token_err, torch.zeros(grow, dtype=torch.float64)])
                self.vocab_size = vocab
            self.token_count += torch.bincount(y, minlength=self.vocab_size)
            self.token_err += torch.bincount(y, weights=err, minlength=self.vocab_size)
            if pairs.numel():
                uniq, cnt = torch.unique(pairs[:, 0] * vocab + pairs[:, 1], return_counts=True)
                conf = self.confusions
                for key, c in zip(uniq.tolist(), cnt.tolist()):
                    ab = divmod(key, vocab)
                    conf[ab] = conf.get(ab, 0) + c
            stats = stats.tolist()
            row = self.history.setdefault(p["step"], [0.0] * (len(HISTORY_COLUMNS) - 1))
            for i, v in enumerate(stats):
                row[i] += v
        self._pending = []

    def step_stats(self, step: int) -> dict | None:
        """Means over the counted tokens of one step: error mass ``1 - p(y)``, ``||ell||^2``, token loss,
        residual mass; ``None`` for a step never seen."""
        self.flush()
        row = self.history.get(step)
        if row is None or row[0] == 0:
            return None
        n = row[0]
        return {"tokens": int(n), "err_mass": row[1] / n, "err_sq": row[2] / n, "nll": row[3] / n,
                "residual": row[4] / n}

    def history_table(self) -> list[dict]:
        """One dict per step seen: ``step, tokens, err_mass, err_sq, nll, residual`` (means)."""
        self.flush()
        return [{"step": s, **self.step_stats(s)} for s, row in self.history.items() if row[0] > 0]

    def top_confusions(self, n: int = 10) -> list[tuple[int, int, int]]:
        """The ``n`` most frequent ``(label, predicted, count)`` with predicted (top-1) != label."""
        self.flush()
        items = sorted(self.confusions.items(), key=lambda kv: (-kv[1], kv[0]))
        return [(a, b, c) for (a, b), c in items[:n]]

    def worst_tokens(self, n: int = 10, min_count: int = 5) -> list[tuple[int, float, int]]:
        """The ``n`` label ids with the largest mean error mass (seen at least ``min_count`` times):
        ``(id, mean error mass, count)``."""
        self.flush()
        ok = self.token_count >= min_count
        if not bool(ok.any()):
            return []
        mean = self.token_err / self.token_count.clamp(min=1)
        mean = torch.where(ok, mean, torch.full_like(mean, -1.0))
        order = torch.argsort(mean, descending=True, stable=True)[: min(n, int(ok.sum()))]
        return [(int(i), float(mean[i]), int(self.token_count[i])) for i in order]

    # ------------------------------------------------------------------ reading
    def sample(self, device=None, generator: torch.Generator | None = None) -> LogEntry:
        """One entry drawn uniformly (seeded generator), copied to ``device`` (non-blocking from pinned
        memory)."""
        if not self.entries:
            raise ValueError("MistakeLog: cannot sample from an empty log (push an entry first)")
        g = generator if generator is not None else self.generator
        i = int(torch.randint(len(self.entries), (1,), generator=g))
        entry = self.entries[i]
        if device is None or torch.device(device).type == "cpu":
            self._wait(entry)
            return entry
        # Host -> device copies run on the same stream after the device -> host copies that filled the
        # pinned buffers, so no host synchronisation is needed here.
        return entry.to(device, non_blocking=self.pin_memory)

    def __getitem__(self, i: int) -> LogEntry:
        entry = self.entries[i]
        self._wait(entry)
        return entry

    def _wait_all(self) -> None:
        for e in self.entries:
            self._wait(e)

    # ------------------------------------------------------------------ state
    def _summary_tensors(self) -> dict[str, torch.Tensor]:
        self.flush()
        steps = list(self.history.keys())
        hist = torch.tensor([[s, *self.history[s]] for s in steps], dtype=torch.float64).reshape(
            -1, len(HISTORY_COLUMNS))
        conf = sorted(self.confusions.items())
        return {
            "history": hist,
            "token_count": self.token_count.clone(),
            "token_err": self.token_err.clone(),
            "confusion_pairs": torch.tensor([list(k) for k, _ in conf], dtype=torch.int64).reshape(-1, 2),
            "confusion_counts": torch.tensor([c for _, c in conf], dtype=torch.int64),
            "generator_state": self.generator.get_state(),
        }

    def _counters(self) -> dict:
        return {"evicted": self.evicted, "dropped": self.dropped, "pushed": self.pushed,
                "vocab_size": self.vocab_size, "next_step": self.next_step}

    def _load_summary(self, s: dict[str, torch.Tensor], counters: dict) -> None:
        self.history = OrderedDict(
            (int(row[0]), [float(v) for v in row[1:]]) for row in s["history"].tolist())
        self.token_count = s["token_count"].clone().to(torch.int64)
        self.token_err = s["token_err"].clone().to(torch.float64)
        self.confusions = {(int(a), int(b)): int(c) for (a, b), c in
                           zip(s["confusion_pairs"].tolist(), s["confusion_counts"].tolist())}
        self.generator.set_state(s["generator_state"].clone())
        self.evicted, self.dropped = int(counters["evicted"]), int(counters["dropped"])
        self.pushed, self.vocab_size = int(counters["pushed"]), int(counters["vocab_size"])
        self.next_step = counters.get("next_step")
        self._pending = []

    def state_dict(self) -> dict:
        """Everything needed to continue exactly: config, entries, summary, counters, generator state."""
        self._wait_all()
        return {
            "config": self.config(),
            "entries": [{"step": e.step, "tensors": e.tensors()} for e in self.entries],
            "summary": self._summary_tensors(),
            "counters": self._counters(),
        }

    def _make_entry(self, step: int, tensors: dict[str, torch.Tensor]) -> LogEntry:
        kw = {}
        for k in LogEntry.TENSOR_FIELDS:
            t = tensors.get(k)
            if t is not None:
                t = t.contiguous()
                if self.pin_memory and torch.cuda.is_available():
                    t = t.pin_memory()
                else:
                    t = t.clone()
            kw[k] = t
        return LogEntry(step=int(step), **kw)

    def load_state_dict(self, state: dict) -> None:
        """Replace this log's content by ``state`` (from :meth:`state_dict`); the config must match in
        ``topk``, ``pooled_dtype`` and ``topk_dtype``; capacity and budget are taken from ``state``."""
        cfg = state["config"]
        for key in ("topk", "pooled_dtype", "topk_dtype"):
            if cfg[key] != getattr(self, key):
                raise ValueError(f"state: expected {key}={getattr(self, key)!r} (this log), got {cfg[key]!r}")
        self.capacity, self.max_bytes, self.seed = cfg["capacity"], cfg["max_bytes"], cfg["seed"]
        self.ignore_index = cfg.get("ignore_index", self.ignore_index)
        self.entries = [self._make_entry(e["step"], e["tensors"]) for e in state["entries"]]
        self._events = {}
        self.nbytes = sum(e.nbytes for e in self.entries)
        self._load_summary(state["summary"], state["counters"])

    def save(self, directory: str, shard_bytes: int = 256 << 20) -> str:
        """Write the log to ``directory``: ``entries-XXXXX-of-YYYYY.safetensors`` shards (at most about
        ``shard_bytes`` each; an entry is never split), ``summary.safetensors`` and the JSON index
        ``mistake_log.json``. Existing shards in ``directory`` are replaced. Returns the index path."""
        from safetensors.torch import save_file

        os.makedirs(directory, exist_ok=True)
        for name in os.listdir(directory):
            if name.startswith("entries-") and name.endswith(".safetensors"):
                os.remove(os.path.join(directory, name))
        self._wait_all()
        shards: list[list[int]] = []
        size = 0
        for i, e in enumerate(self.entries):
            if not shards or (size + e.nbytes > shard_bytes and shards[-1]):
                shards.append([])
                size = 0
            shards[-1].append(i)
            size += e.nbytes
        index_entries = []
        for s, members in enumerate(shards):
            fname = f"entries-{s + 1:05d}-of-{len(shards):05d}.safetensors"
            payload = {}
            for i in members:
                e = self.entries[i]
                for k, t in e.tensors().items():
                    payload[f"{i}.{k}"] = t.contiguous()
                index_entries.append({"step": e.step, "file": fname, "key": str(i),
                                      "fields": sorted(e.tensors()), "nbytes": e.nbytes,
                                      "tokens": e.num_tokens})
            save_file(payload, os.path.join(directory, fname), metadata={"format": FORMAT})
        save_file({k: v.contiguous() for k, v in self._summary_tensors().items()},
                  os.path.join(directory, SUMMARY_NAME), metadata={"format": FORMAT})
        index = {"format": FORMAT, "version": FORMAT_VERSION, "config": self.config(),
                 "counters": self._counters(), "usage": self.usage(),
                 "history_columns": list(HISTORY_COLUMNS), "entries": index_entries}
        path = os.path.join(directory, INDEX_NAME)
        tmp = path + ".tmp"
        with open(tmp, "w") as fh:
            json.dump(index, fh, indent=1)
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, directory: str, pin_memory: bool | None = None) -> MistakeLog:
        """Read a log written by :meth:`save`."""
        from safetensors import safe_open
        from safetensors.torch import load_file

        path = os.path.join(directory, INDEX_NAME)
        if not os.path.exists(path):
            raise ValueError(f"directory: expected a saved MistakeLog with {INDEX_NAME}, got {directory!r}")
        with open(path) as fh:
            index = json.load(fh)
        if index.get("format") != FORMAT:
            raise ValueError(f"directory: {path!r} is not a {FORMAT} index (format={index.get('format')!r})")
        log = cls(pin_memory=pin_memory, **index["config"])
        handles: dict[str, object] = {}
        entries = []
        try:
            for e in index["entries"]:
                if e["file"] not in handles:
                    handles[e["file"]] = safe_open(os.path.join(directory, e["file"]), framework="pt")
                f = handles[e["file"]]
                tensors = {k: f.get_tensor(f"{e['key']}.{k}") for k in e["fields"]}
                entries.append(log._make_entry(e["step"], tensors))
        finally:
            handles.clear()
        log.entries = entries
        log.nbytes = sum(e.nbytes for e in entries)
        log._load_summary(load_file(os.path.join(directory, SUMMARY_NAME)), index["counters"])
        return log


def log_bytes_per_token(d: int, k: int, pooled_dtype: str | None = "bfloat16", topk_dtype: str = "float32",
                        counted_fraction: float = 1.0) -> float:
    """Bytes per real token of a :class:`MistakeLog` entry (ids, mask, target + counted-row statistics)."""
    per_row = 4 + 1 + 4  # input id int32, mask bool, target int32
    counted = 4 + 4 + k * (4 + torch.finfo(getattr(torch, topk_dtype)).bits // 8)  # lse, p_target, ids, logp
    pooled = 0
    if pooled_dtype == "int8":
        pooled = d + 4
    elif pooled_dtype is not None:
        pooled = d * torch.finfo(getattr(torch, pooled_dtype)).bits // 8
    return per_row + counted_fraction * counted + pooled


def naive_bytes_per_token(d: int, vocab_size: int, layers: int, dtype_bytes: int = 4) -> int:
    """Bytes per token of storing the full error vector, the input embedding and every layer's state."""
    return dtype_bytes * (vocab_size + d * (layers + 1))


__all__ = [
    "MistakeLog",
    "LogEntry",
    "residual_mass",
    "sparse_errors",
    "dense_errors",
    "quantise_rows",
    "dequantise_rows",
    "log_bytes_per_token",
    "naive_bytes_per_token",
]
