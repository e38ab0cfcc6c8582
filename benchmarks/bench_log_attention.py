"""Speed of ``log_attention`` (position-masked, GQA attention of the Copilot) against SDPA and FlexAttention.

Masks (DESIGN 4.5: key j visible to query i iff ``0 <= k_pos[j] <= q_pos[i]``):

* ``causal``: self-attention, ``q_pos = k_pos = arange(L)``;
* ``log2seg``: attention over the Mistake Log ``[X~ ; pooled h]``: ``q_pos = arange(L)``,
  ``k_pos = cat(arange(L), arange(L))`` (``Lk = 2L``), not expressible as ``is_causal``;
* ``decode``: one query (``Lq = 1``) at the last position against a cache of ``Lk`` keys, all visible.

Providers: ``naive`` (``log_attention_reference``: the full score matrix and boolean mask), ``torch`` and
``triton`` (``tcopilot.log_attention(impl=...)``), ``sdpa`` (``F.scaled_dot_product_attention``: ``is_causal``
for the causal mask, an explicit boolean mask for the log, no mask for decode; GQA through ``enable_gqa``
where the backend accepts it, else K/V expanded to all query heads before timing) and ``flex``
(FlexAttention with the position rule as a ``mask_mod`` and a precomputed block mask; CUDA only).

Work model, counting only unmasked work: ``4 * pairs * Hq * D`` flops forward (``pairs`` = visible
(query, key) pairs per head, ``D = Dv``), backward 2.5x the forward (the FlashAttention convention), so
``fwd_bwd`` is 3.5x. Decode is memory-bound: bytes = K and V read once, plus q and the output.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from benchutil import (
    DEVICE,
    ON_GPU,
    OneSlot,
    assert_close,
    case,
    compile_status,
    dtype_name,
    need_triton,
    release,
    require_memory,
    run_bench,
    set_group,
    zero_grads,
)

from tcopilot import log_attention, log_attention_reference


@dataclass(frozen=True)
class Cfg:
    b: int
    hq: int
    hk: int
    length: int  # L: queries (and the cache length for decode)
    d: int
    dtype: torch.dtype
    mask: str  # causal | log2seg | decode

    @property
    def id(self) -> str:
        return f"B{self.b}-Hq{self.hq}-Hk{self.hk}-L{self.length}-D{self.d}"

    @property
    def lq(self) -> int:
        return 1 if self.mask == "decode" else self.length

    @property
    def lk(self) -> int:
        return 2 * self.length if self.mask == "log2seg" else self.length


CPU_TRAIN = [dict(b=1, hq=4, hk=2, length=128, d=32, dtype=torch.float32)]
# Issue 4's shapes; the second one gives no Hk: taken as Hk = Hq (no GQA).
GPU_TRAIN = [
    dict(b=4, hq=32, hk=8, length=4096, d=128, dtype=torch.bfloat16),
    dict(b=8, hq=16, hk=16, length=2048, d=64, dtype=torch.bfloat16),
]
CPU_DECODE = [dict(b=b, hq=4, hk=2, length=256, d=32, dtype=torch.float32) for b in (1, 4)]
GPU_DECODE = [dict(b=b, hq=32, hk=8, length=4096, d=128, dtype=torch.bfloat16) for b in (1, 4, 16, 64)]
GPU_DECODE_FULL_ONLY = {4}  # batch sizes skipped in the quick scope

TRAIN_PROVIDERS = ["naive", "torch", "triton", "sdpa", "flex"]
DECODE_PROVIDERS = ["naive", "torch", "triton", "sdpa"]


def _cases():
    out = []
    for gpu, train, decode in ((False, CPU_TRAIN, CPU_DECODE), (True, GPU_TRAIN, GPU_DECODE)):
        for kw in train:
            for mask in ("causal", "log2seg"):
                cfg = Cfg(mask=mask, **kw)
                for mode in ("fwd", "fwd_bwd"):
                    for prov in TRAIN_PROVIDERS:
                        cid = f"{cfg.id}-{dtype_name(cfg.dtype)}-{mask}-{mode}-{prov}"
                        # FlexAttention's target is the log mask (SDPA's flash backend is causal's): its
                        # causal compiles (a minute or more each) run in the full scope only
                        full = gpu and prov == "flex" and mask == "causal"
                        out.append(case((cfg, mode, prov), id=cid, gpu=gpu, full=full, provider=prov))
        for kw in decode:
            cfg = Cfg(mask="decode", **kw)
            for prov in DECODE_PROVIDERS:
                cid = f"{cfg.id}-{dtype_name(cfg.dtype)}-decode-fwd-{prov}"
                full = gpu and cfg.b in GPU_DECODE_FULL_ONLY
                out.append(case((cfg, "fwd", prov), id=cid, gpu=gpu, full=full, provider=prov))
    return out


# ----------------------------------------------------------------------------------------------- inputs


@dataclass
class Inputs:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    q_pos: torch.Tensor
    k_pos: torch.Tensor
    grad_out: torch.Tensor

    def leaves(self):
        return [self.q, self.k, self.v]


def positions(cfg: Cfg) -> tuple[torch.Tensor, torch.Tensor]:
    ar = torch.arange(cfg.length, device=DEVICE)
    if cfg.mask == "causal":
        q_pos, k_pos = ar, ar
    elif cfg.mask == "log2seg":
        q_pos, k_pos = ar, torch.cat([ar, ar])
    else:
        q_pos, k_pos = ar[-1:], ar
    return q_pos.expand(cfg.b, -1).contiguous(), k_pos.expand(cfg.b, -1).contiguous()


def make_inputs(cfg: Cfg) -> Inputs:
    g = torch.Generator(device=DEVICE).manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, device=DEVICE, generator=g).to(cfg.dtype).requires_grad_()

    q_pos, k_pos = positions(cfg)
    q = rnd(cfg.b, cfg.hq, cfg.lq, cfg.d)
    k = rnd(cfg.b, cfg.hk, cfg.lk, cfg.d)
    v = rnd(cfg.b, cfg.hk, cfg.lk, cfg.d)
    grad_out = torch.randn(cfg.b, cfg.hq, cfg.lq, cfg.d, device=DEVICE, generator=g).to(cfg.dtype)
    return Inputs(q, k, v, q_pos, k_pos, grad_out)


def visible_pairs(q_pos: torch.Tensor, k_pos: torch.Tensor) -> int:
    """Number of visible (query, key) pairs, summed over the batch (per head)."""
    total = 0
    for b in range(q_pos.shape[0]):
        keys = torch.sort(k_pos[b][k_pos[b] >= 0]).values
        total += int(torch.searchsorted(keys, q_pos[b], right=True).sum())
    return total


def visible_mask(q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
    """[B, 1, Lq, Lk] boolean mask (True = attend), for SDPA."""
    return ((k_pos[:, None, :] >= 0) & (k_pos[:, None, :] <= q_pos[:, :, None]))[:, None]


# ------------------------------------------------------------------------------------------------ check

# Rows of the output the check compares (the reference materialises [B, Hq, Lq, Lk] in fp32: at the GPU
# shapes only a slice of batch 0, two kv-head groups and 256 query rows is compared).
CHECK_ROWS = 128


def reference_slice(cfg: Cfg, inp: Inputs):
    """(index, reference output, reference grads or None): the whole problem when small, else a slice."""
    small = cfg.b * cfg.hq * cfg.lq * cfg.lk <= 2**24
    q, k, v = (t.detach().float() for t in inp.leaves())
    if small:
        q, k, v = (t.requires_grad_() for t in (q, k, v))
        out = log_attention_reference(q, k, v, q_pos=inp.q_pos, k_pos=inp.k_pos)
        out.backward(inp.grad_out.float())
        return None, out.detach(), [q.grad, k.grad, v.grad]
    group = cfg.hq // cfg.hk
    hk = min(2, cfg.hk)
    rows = torch.arange(cfg.lq, device=DEVICE)
    if cfg.lq > 2 * CHECK_ROWS:
        rows = torch.cat([rows[:CHECK_ROWS], rows[-CHECK_ROWS:]])
    idx = (slice(0, 1), slice(0, hk * group), rows)
    out = log_attention_reference(
        q[idx[0], idx[1]][:, :, rows], k[:1, :hk], v[:1, :hk], q_pos=inp.q_pos[:1, rows], k_pos=inp.k_pos[:1]
    )
    return idx, out, None


def _select(t: torch.Tensor, idx):
    return t if idx is None else t[idx[0], idx[1]][:, :, idx[2]]


# -------------------------------------------------------------------------------------------- providers


def _sdpa_variants(cfg: Cfg, inp: Inputs):
    """Candidate SDPA calls, best first: (description, fn, k, v)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    group = cfg.hq // cfg.hk
    kwargs = {}
    if cfg.mask == "causal":
        kwargs["is_causal"] = True  # Lq == Lk and positions are arange: the same mask
        backends = [SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION]
        name = "is_causal"
    elif cfg.mask == "log2seg":
        kwargs["attn_mask"] = visible_mask(inp.q_pos, inp.k_pos)
        backends = [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]
        name = "bool mask"
    else:
        backends = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]
        name = "no mask"
    q = inp.q
    variants = []
    backend_sets = [("any backend", None)]
    if ON_GPU:  # prefer the fused kernels; fall back to whatever SDPA picks
        backend_sets.insert(0, ("fused backends", backends))
    for bname, bset in backend_sets:
        def ctx(bset=bset):
            return sdpa_kernel(bset) if bset is not None else nullcontext()

        if group > 1:
            def gqa(ctx=ctx):
                with ctx():
                    return F.scaled_dot_product_attention(q, inp.k, inp.v, enable_gqa=True, **kwargs)

            variants.append((f"{name}, enable_gqa, {bname}", gqa, None))
            # Expanded K/V are separate leaves prepared outside the timed step (the gradient then stops at
            # the expanded tensors, a small saving for SDPA).
            kx = inp.k.detach().repeat_interleave(group, dim=1).requires_grad_()
            vx = inp.v.detach().repeat_interleave(group, dim=1).requires_grad_()

            def expanded(ctx=ctx, kx=kx, vx=vx):
                with ctx():
                    return F.scaled_dot_product_attention(q, kx, vx, **kwargs)

            variants.append((f"{name}, K/V expanded to Hq, {bname}", expanded, (kx, vx)))
        else:
            def mha(ctx=ctx):
                with ctx():
                    return F.scaled_dot_product_attention(q, inp.k, inp.v, **kwargs)

            variants.append((f"{name}, {bname}", mha, None))
    return variants


_flex_compiled = None


def _flex(cfg: Cfg, inp: Inputs):
    global _flex_compiled
    if not ON_GPU:
        pytest.skip("FlexAttention is benchmarked on CUDA only")
    reason = compile_status()
    if reason:
        pytest.skip(f"FlexAttention needs torch.compile: {reason}")
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError as err:
        pytest.skip(f"FlexAttention not available in torch {torch.__version__}: {err}")
    q_pos, k_pos = inp.q_pos, inp.k_pos

    def mask_mod(b, h, q_idx, kv_idx):
        kp = k_pos[b, kv_idx]
        return (kp >= 0) & (kp <= q_pos[b, q_idx])

    block_mask = create_block_mask(mask_mod, cfg.b, None, cfg.lq, cfg.lk, device=DEVICE)
    if _flex_compiled is None:
        _flex_compiled = torch.compile(flex_attention, dynamic=False)
    gqa = cfg.hq != cfg.hk
    return lambda: _flex_compiled(inp.q, inp.k, inp.v, block_mask=block_mask, enable_gqa=gqa)


INPUTS = OneSlot()
REFS = OneSlot()



@pytest.fixture(autouse=True, scope="module")
def _release_module_state():
    yield
    release(INPUTS, REFS)


@pytest.mark.parametrize(("cfg", "mode", "provider"), _cases())
def test_log_attention_speed(benchmark, cfg: Cfg, mode: str, provider: str):
    inp = INPUTS.get(cfg, lambda: make_inputs(cfg))
    leaves = inp.leaves()
    extra = {}
    if provider == "naive":
        n_scores = cfg.b * cfg.hq * cfg.lq * cfg.lk
        require_memory(n_scores * 4 * (5 if mode == "fwd" else 9), "naive fp32 score matrices")
        fwd = lambda: log_attention_reference(inp.q, inp.k, inp.v, q_pos=inp.q_pos, k_pos=inp.k_pos)  # noqa: E731
    elif provider in ("torch", "triton"):
        if provider == "triton":
            need_triton("log_attention")
        fwd = lambda: log_attention(inp.q, inp.k, inp.v, q_pos=inp.q_pos, k_pos=inp.k_pos, impl=provider)  # noqa: E731
    elif provider == "sdpa":
        fwd = None
        errors = []
        for desc, fn, extra_leaves in _sdpa_variants(cfg, inp):
            try:
                zero_grads(leaves)
                out = fn()
                if mode == "fwd_bwd":
                    out.backward(inp.grad_out)
            except (RuntimeError, TypeError) as err:  # backend or enable_gqa not supported here
                errors.append(f"{desc}: {str(err).splitlines()[0][:120]}")
                continue
            fwd, extra["sdpa_variant"] = fn, desc
            if extra_leaves is not None:
                leaves = leaves + list(extra_leaves)
            break
        if fwd is None:
            pytest.skip("no SDPA variant runs here: " + "; ".join(errors))
    elif provider == "flex":
        fwd = _flex(cfg, inp)
    else:
        raise ValueError(provider)

    def step():
        out = fwd()
        if mode == "fwd_bwd":
            out.backward(inp.grad_out)
        return out

    # Correctness first, untimed (also compiles / autotunes).
    idx, ref_out, ref_grads = REFS.get(cfg, lambda: reference_slice(cfg, inp))
    zero_grads(leaves)
    out = step()
    assert_close(f"{provider} output", _select(out, idx), ref_out, cfg.dtype)
    if mode == "fwd_bwd" and ref_grads is not None and "K/V expanded" not in extra.get("sdpa_variant", ""):
        for name, t, rg in zip(("dq", "dk", "dv"), inp.leaves(), ref_grads):
            assert_close(f"{provider} {name}", t.grad, rg, cfg.dtype)
    del out

    pairs = visible_pairs(inp.q_pos, inp.k_pos)
    fwd_flops = 4 * pairs * cfg.hq * cfg.d
    flops = fwd_flops if mode == "fwd" else 3.5 * fwd_flops
    elt = torch.finfo(cfg.dtype).bits // 8
    nbytes = (2 * cfg.b * cfg.hk * cfg.lk * cfg.d + 2 * cfg.b * cfg.hq * cfg.lq * cfg.d) * elt
    decode = cfg.mask == "decode"
    shape = f"{cfg.id} {cfg.mask} Lq={cfg.lq} Lk={cfg.lk}"
    set_group(benchmark, "log_attention", shape, cfg.dtype, mode, provider, mask=cfg.mask,
              visible_fraction=pairs / (cfg.b * cfg.lq * cfg.lk), **extra)
    rounds = 50 if decode and ON_GPU else None
    run_bench(benchmark, step, setup=lambda: zero_grads(leaves), flops=flops,
              nbytes=nbytes if decode else None, bound="memory" if decode else "compute", rounds=rounds)


def test_flop_model_counts_unmasked_pairs():
    """The work model: a causal L x L mask has L(L+1)/2 visible pairs, the two-segment log twice that."""
    cfg = Cfg(1, 1, 1, 16, 8, torch.float32, "causal")
    assert visible_pairs(*positions(cfg)) == 16 * 17 // 2
    cfg = Cfg(2, 1, 1, 16, 8, torch.float32, "log2seg")
    assert visible_pairs(*positions(cfg)) == 2 * 16 * 17
    assert math.isclose(float(visible_mask(*positions(cfg)).float().mean()), 17 / 32)
