"""Pure-PyTorch production path for ``log_attention``.

Queries are processed in blocks so that only one block's scores ``[B, Hq, block, Lk]`` exist at a time,
in the forward *and* in the backward: a hand-written autograd Function saves only the inputs and the
per-row log-sum-exp (flash-attention style) and recomputes the block's probabilities when the gradient
is needed. For each query block only the span of keys that some query of the block can see is touched,
so a causal mask costs about half of the full product.

GQA: query head ``h`` reads kv head ``h // G`` (``G = Hq // Hk``), so ``q`` viewed as ``[B, Hk, G, Lq, D]``
lines the G query heads of a kv head up against it and K/V are never repeated.

Math is fp32 (fp64 for fp64 inputs); outputs and gradients are returned in the inputs' dtypes.
Double backward is not supported.

On CPU tensors whose whole score tensor fits in one block's budget (and ``Dv == D``), one call of
``F.scaled_dot_product_attention`` with the positions' boolean mask does the same work instead: PyTorch's
CPU flash-attention kernel takes the mask and grouped heads, keeps only the output and the log-sum-exp for
its backward, and was 1.7-2.2x faster than the blocked loop forward and 2.0-2.5x forward + backward (best of
40 on a 2-core CPU, fp32, from B=2, Hq=4, L=64, D=16 to B=4, Hq=8, L=256, D=64). It accumulates in fp32 too,
but rounds the probabilities to fp16/bf16 inputs' dtype before their product with V, as flash attention (and
the Triton kernel) does. Rows that see no key are
given key 0 for that call and then zeroed, so their output and gradients are exactly 0 whatever SDPA does
with a fully masked row. As in SDPA and the reference, a masked key's value still meets its probability of
exactly 0 in ``p @ V``, so it must be finite (0 * NaN is NaN); the Triton kernels load padding slots (negative
positions) as zeros instead, and the Copilot's static cache keeps its unfilled slots at zero for this reason.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

# Scores of one block are kept below this many elements (128 MiB in fp32), so memory stays bounded for
# long key sequences; the block never exceeds MAX_BLOCK_Q rows, because beyond that the matmuls are
# already large enough to run at full speed.
_SCORE_BUDGET = 1 << 25
MAX_BLOCK_Q = 256


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _visible(q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
    """``[B, Lq, Lk]``: key j is visible to query i."""
    return (k_pos[:, None, :] >= 0) & (k_pos[:, None, :] <= q_pos[:, :, None])


def _block_plan(q_pos: torch.Tensor, k_pos: torch.Tensor, block_q: int) -> list[tuple[int, int, int, int]]:
    """``(i0, i1, j0, j1)`` per query block: keys outside ``[j0, j1)`` are invisible to the whole block.

    Visibility ``0 <= k_pos <= q_pos`` is monotone in ``q_pos``, so the keys some query of a block sees
    are exactly those visible to the block's largest position. ``j0 == j1`` means nothing is visible.
    """
    lq, lk = q_pos.shape[1], k_pos.shape[1]
    starts = list(range(0, lq, block_q))
    q_max = torch.stack([q_pos[:, i0 : i0 + block_q].amax(dim=1) for i0 in starts], dim=1)  # [B, nblk]
    cols = ((k_pos[:, None, :] >= 0) & (k_pos[:, None, :] <= q_max[:, :, None])).any(dim=0)  # [nblk, Lk]
    has_any = cols.any(dim=1)
    ar = torch.arange(lk, device=cols.device)
    first = torch.where(cols, ar, lk).amin(dim=1)
    last = torch.where(cols, ar, -1).amax(dim=1) + 1
    first = torch.where(has_any, first, 0)
    last = torch.where(has_any, last, 0)
    # One host sync for the whole call instead of one per block.
    spans = torch.stack([first, last], dim=1).tolist()
    return [(i0, min(i0 + block_q, lq), j0, j1) for i0, (j0, j1) in zip(starts, spans)]


def _block_scores(qb, kb, qp, kp, scale):
    """Masked scores ``[B, Hk, G, n, Lkb]`` (-inf where invisible) of one query block."""
    b, hk, g, n, d = qb.shape
    s = torch.matmul(qb.reshape(b, hk, g * n, d), kb.transpose(-1, -2)).mul_(scale)
    s = s.view(b, hk, g, n, -1)
    return s.masked_fill_(~_visible(qp, kp)[:, None, None], float("-inf"))


def _forward(q, k, v, q_pos, k_pos, scale, block_q):
    b, hq, lq, d = q.shape
    hk, dv = k.shape[1], v.shape[3]
    g = hq // hk
    acc = _acc_dtype(q.dtype)
    qg = q.reshape(b, hk, g, lq, d)
    kf, vf = k.to(acc), v.to(acc)
    out = torch.zeros(b, hk, g, lq, dv, dtype=acc, device=q.device)
    # +inf marks rows with no visible key: exp(s - lse) is then exactly 0 in the backward.
    lse = torch.full((b, hk, g, lq), float("inf"), dtype=acc, device=q.device)
    for i0, i1, j0, j1 in _block_plan(q_pos, k_pos, block_q):
        if j0 == j1:
            continue
        n = i1 - i0
        s = _block_scores(
            qg[:, :, :, i0:i1].to(acc), kf[:, :, j0:j1], q_pos[:, i0:i1], k_pos[:, j0:j1], scale
        )
        m = s.amax(dim=-1, keepdim=True)
        # Rows with no visible key have m = -inf; any finite m keeps exp(-inf - m) = 0 instead of NaN.
        m = m.masked_fill_(m == float("-inf"), 0.0)
        e = torch.exp_(s.sub_(m))
        denom = e.sum(dim=-1, keepdim=True)
        o = torch.matmul(e.view(b, hk, g * n, -1), vf[:, :, j0:j1]).view(b, hk, g, n, dv)
        out[:, :, :, i0:i1] = o / torch.where(denom > 0, denom, 1.0)
        lse[:, :, :, i0:i1] = torch.where(denom > 0, m + denom.log(), float("inf")).squeeze(-1)
    return out.reshape(b, hq, lq, dv).to(q.dtype), lse


def _backward(dout, q, k, v, q_pos, k_pos, lse, scale, block_q, needs):
    b, hq, lq, d = q.shape
    hk, lk, dv = k.shape[1], k.shape[2], v.shape[3]
    g = hq // hk
    acc = _acc_dtype(q.dtype)
    qg = q.reshape(b, hk, g, lq, d)
    dog = dout.reshape(b, hk, g, lq, dv)
    kf, vf = k.to(acc), v.to(acc)
    dq = torch.zeros(b, hk, g, lq, d, dtype=acc, device=q.device) if needs[0] else None
    dk = torch.zeros(b, hk, lk, d, dtype=acc, device=q.device) if needs[1] else None
    dvv = torch.zeros(b, hk, lk, dv, dtype=acc, device=q.device) if needs[2] else None
    for i0, i1, j0, j1 in _block_plan(q_pos, k_pos, block_q):
        if j0 == j1:
            continue
        n = i1 - i0
        qb = qg[:, :, :, i0:i1].to(acc)
        s = _block_scores(qb, kf[:, :, j0:j1], q_pos[:, i0:i1], k_pos[:, j0:j1], scale)
        p = torch.exp_(s.sub_(lse[:, :, :, i0:i1, None])).view(b, hk, g * n, -1)
        do = dog[:, :, :, i0:i1].to(acc).reshape(b, hk, g * n, dv)
        if dvv is not None:
            dvv[:, :, j0:j1] += torch.matmul(p.transpose(-1, -2), do)
        if dq is None and dk is None:
            continue
        dp = torch.matmul(do, vf[:, :, j0:j1].transpose(-1, -2))
        # delta_i = sum_j p_ij dp_ij equals rowsum(dO * O) without needing O saved at full precision.
        delta = (p * dp).sum(dim=-1, keepdim=True)
        ds = p.mul_(dp.sub_(delta)).mul_(scale)
        if dq is not None:
            dq[:, :, :, i0:i1] = torch.matmul(ds, kf[:, :, j0:j1]).view(b, hk, g, n, d)
        if dk is not None:
            dk[:, :, j0:j1] += torch.matmul(ds.transpose(-1, -2), qb.reshape(b, hk, g * n, d))
    return (
        None if dq is None else dq.reshape(b, hq, lq, d).to(q.dtype),
        None if dk is None else dk.to(k.dtype),
        None if dvv is None else dvv.to(v.dtype),
    )


class LogAttentionTorchFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, q_pos, k_pos, scale, block_q):
        out, lse = _forward(q, k, v, q_pos, k_pos, scale, block_q)
        ctx.save_for_backward(q, k, v, q_pos, k_pos, lse)
        ctx.scale, ctx.block_q = scale, block_q
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        q, k, v, q_pos, k_pos, lse = ctx.saved_tensors
        needs = ctx.needs_input_grad[:3]
        dq, dk, dv = _backward(dout, q, k, v, q_pos, k_pos, lse, ctx.scale, ctx.block_q, needs)
        return dq, dk, dv, None, None, None, None


def _sdpa_serves(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether the one-call SDPA path of the module docstring takes this problem."""
    b, hq, lq, d = q.shape
    # The budget bounds memory even where SDPA falls back to its math backend (which materialises the scores).
    return q.device.type == "cpu" and v.shape[3] == d and b * hq * lq * k.shape[2] <= _SCORE_BUDGET


def _log_attention_sdpa(q, k, v, q_pos, k_pos, scale: float) -> torch.Tensor:
    visible = _visible(q_pos, k_pos)
    # Queries that see no key: those before every valid key (visibility is 0 <= k_pos <= q_pos).
    first = torch.where(k_pos >= 0, k_pos, torch.iinfo(k_pos.dtype).max).amin(dim=1)  # [B]
    blind = q_pos < first[:, None]  # [B, Lq] (a negative q_pos is below every valid key)
    visible[:, :, 0] |= blind
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=visible[:, None], scale=scale, enable_gqa=q.shape[1] != k.shape[1]
    )
    # masked_fill's gradient is 0 where it fills: those rows' dO is 0, so they add nothing to dq, dk, dv.
    return out.masked_fill(blind[:, None, :, None], 0.0)


def log_attention_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    scale: float,
    *,
    block_q: int | None = None,
) -> torch.Tensor:
    """PyTorch ``log_attention`` on validated inputs (see ``tcopilot.log_attention``).

    ``block_q`` overrides the number of query rows per block (default: at most ``MAX_BLOCK_Q``, fewer
    when the scores of a block would exceed the memory budget); given, it also forces the blocked loop
    where the one-call SDPA path (module docstring) would otherwise run.
    """
    if block_q is None and _sdpa_serves(q, k, v):
        return _log_attention_sdpa(q, k, v, q_pos, k_pos, scale)
    if block_q is None:
        per_query_row = q.shape[0] * q.shape[1] * k.shape[2]
        block_q = max(1, min(MAX_BLOCK_Q, _SCORE_BUDGET // per_query_row))
    return LogAttentionTorchFunction.apply(q, k, v, q_pos, k_pos, float(scale), int(block_q))
