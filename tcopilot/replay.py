"""Training the Copilot from the compressed Mistake Log (``log_mode="replay"``; Algorithm 1, lines 13-19).

A stored entry (:class:`tcopilot.mistake_log.LogEntry`) holds, per counted token, the label and the Pilot's
top-k ids with their probabilities, so the rebuilt error ``ell^ = onehot(y) - p^_topk`` has at most K+1
non-zeros. Everything the Copilot needs from it is a gather at those ids (DESIGN.md 4.4):

- input embedding: ``error_in(ell^) = A[:, y] - sum_j p_j A[:, id_j] + a``;
- loss: ``||f - ell^||^2 = ||f||^2 - 2 f.ell^ + ||ell^||^2`` with ``||f||^2`` in the Gram form of DESIGN.md
  4.2, ``f.ell^ = sum_m coef_m (B[id_m].g + b[id_m])`` and ``||ell^||^2 = 1 - 2 p^(y) + sum_j p_j^2``.

Both gathers are ``F.embedding_bag(..., per_sample_weights=coef, mode="sum")``: ``O(N K c)`` work, ``O(N c)``
memory, and the backward scatters into only the touched rows of ``A`` and ``B``.

``X~`` is not stored: it is recomputed from the stored token ids by running the Pilot's own forward up to
its first decoder layer (:func:`pilot_input_states`), so whatever the architecture adds before that layer
(GPT-2's learned position embeddings from the stored positions, Gemma's embedding scale) is included. It
is computed with the Pilot's *current* weights, while the pooled states are those of the step that stored
them, as in the paper's buffer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tcopilot.kernels.copilot_error_loss.torch_impl import _safe_sqrt
from tcopilot.mistake_log import LogEntry
from tcopilot.pilot import IGNORE_INDEX, find_decoder_layers, pilot_backbone, positions_from_mask, run_base


class _StopForward(Exception):
    """Raised by the hook on the first decoder layer once its input is captured."""


@torch.no_grad()
def pilot_input_states(pilot, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """``X~ [B, L, d]``: the input of the Pilot's first decoder layer (embeddings, and position embeddings
    where the architecture adds them), from token ids and the attention mask, detached. The decoder layers
    are not run."""
    layers = find_decoder_layers(pilot)
    box: dict[str, torch.Tensor] = {}

    def hook(module, args, kwargs):
        hs = args[0] if args else kwargs.get("hidden_states")
        box["x"] = hs.detach()
        raise _StopForward

    handle = layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    pos = positions_from_mask(attention_mask)
    try:
        run_base(pilot_backbone(pilot), input_ids, attention_mask, pos.clamp(min=0))
    except _StopForward:
        pass
    finally:
        handle.remove()
    if "x" not in box:
        raise RuntimeError("pilot: its first decoder layer was never called; cannot recompute X~")
    return box["x"]


def sparse_error_embedding(copilot, counted: torch.Tensor, ids: torch.Tensor,
                           coef: torch.Tensor) -> torch.Tensor:
    """``error_in(ell^)`` for every row ([N, c] fp32, fp64 for fp64 weights): ``sum_m coef_m A[:, ids_m] + a``
    on counted rows, ``a`` elsewhere (the online :func:`tcopilot.pilot.error_embedding` with the sparse
    error). ``counted``: the ``[N]`` bool mask of the rows of ``ids`` / ``coef``, which hold one row per ``True``
    in order; their number sizes the row indices (``torch.nonzero_static``), so nothing is read on the host."""
    a_w, a_b = copilot.error_in.weight, copilot.error_in.bias  # [c, V], [c]
    cd = torch.float64 if a_w.dtype == torch.float64 else torch.float32
    n, c = counted.shape[0], a_w.shape[0]
    out = torch.zeros(n, c, dtype=cd, device=a_w.device)
    if ids.shape[0]:
        e = F.embedding_bag(ids, a_w.t().to(cd), per_sample_weights=coef.to(cd), mode="sum")
        out = out.index_copy(0, torch.nonzero_static(counted, size=ids.shape[0]).squeeze(1), e)
    return out + a_b.to(cd)


def sparse_error_loss(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                      ids: torch.Tensor, coef: torch.Tensor, ell_sq: torch.Tensor) -> torch.Tensor:
    """Token RMSE ``sqrt(mean_i ||B g_i + b - ell^_i||^2)`` over the rows of ``hidden`` (counted rows only),
    with the sparse ``ell^_i = sum_m coef[i, m] e_{ids[i, m]}`` and ``ell_sq = ||ell^_i||^2``. Never forms a
    V-sized row. fp32 (fp64 when ``hidden`` and ``weight`` are fp64); 0.0 for no rows."""
    cd = torch.float64 if (hidden.dtype == torch.float64 and weight.dtype == torch.float64) else torch.float32
    g, w = hidden.to(cd), weight.to(cd)
    if g.shape[0] == 0:
        return (g.sum() + w.sum() * 0.0) * 0.0
    gram = w.T @ w
    f_sq = ((g @ gram) * g).sum(dim=1)
    bag = F.embedding_bag(ids, w, per_sample_weights=coef.to(cd), mode="sum")  # sum_m coef_m B[ids_m]
    f_ell = (bag * g).sum(dim=1)
    if bias is not None:
        b = bias.to(cd)
        f_sq = f_sq + 2.0 * (g @ (w.T @ b)) + (b * b).sum()
        f_ell = f_ell + (coef.to(cd) * b[ids]).sum(dim=1)
    row = f_sq - 2.0 * f_ell + ell_sq.to(cd)
    return _safe_sqrt(row.sum() / g.shape[0])


def replay_copilot_loss(model, entry: LogEntry, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """The Copilot's token RMSE on one stored entry (same flow as the online path of
    :meth:`tcopilot.TransformerCopilot.forward`, with ``ell^`` for ``ell``, ``X~`` recomputed and the
    stored pooled states). Gradients reach the Copilot only."""
    cop, pilot = model.copilot, model.pilot
    dev = cop.error_in.weight.device
    if entry.input_ids.device != dev:
        entry = entry.to(dev)
    input_ids = entry.input_ids.long()
    mask = entry.attention_mask.long()
    bsz, length = input_ids.shape
    c = cop.config.hidden_size
    pos = positions_from_mask(mask)
    x_tilde = pilot_input_states(pilot, input_ids, mask)
    pooled = entry.pooled_states(x_tilde.dtype)
    counted, ids, coef, ell_sq = entry.sparse_errors(ignore_index)  # no host read (sizes from the entry's shapes)
    emb = sparse_error_embedding(cop, counted, ids, coef).view(bsz, length, c)
    start = cop.error_in.bias.to(emb.dtype).expand(bsz, 1, c)
    stream = torch.cat([start, emb[:, :-1]], dim=1)
    log_states = torch.cat([x_tilde, pooled], dim=1)
    pos = pos.to(torch.int32)  # < L: int32 spares every attention call the int64 rebase (as pilot.py)
    g = cop(stream.to(cop.error_in.weight.dtype), log_states, pos, torch.cat([pos, pos], dim=1))
    # index_select, not g[counted]: a boolean index reads its size back (forward) and so does its backward
    g_counted = g.reshape(bsz * length, c).index_select(0, entry.counted_rows(ignore_index))
    return sparse_error_loss(g_counted, cop.error_out.weight, cop.error_out.bias, ids, coef, ell_sq)


__all__ = ["pilot_input_states", "sparse_error_embedding", "sparse_error_loss", "replay_copilot_loss"]
