"""rectified_decode_head: tiled PyTorch path and Triton kernel (interpreter on CPU) against the reference."""

import pytest
import torch

from tcopilot.kernels.rectified_decode_head import rectified_decode_head, rectified_decode_head_reference
from tcopilot.kernels.rectified_decode_head.reference import decode_head_logits_reference
from tcopilot.kernels.rectified_next_token import rectified_next_token_reference


def _inputs(B=5, d=24, c=40, V=300, seed=0, bias=True, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, d, generator=g)
    w = torch.randn(V, d, generator=g) * 0.3
    gc = torch.randn(B, c, generator=g)
    a = torch.randn(V, c, generator=g) * 0.02
    b = torch.randn(V, generator=g) * 0.01 if bias else None
    cast = (lambda t: t.to(dtype)) if dtype != torch.float32 else (lambda t: t)
    return cast(h), cast(w), cast(gc), cast(a), (cast(b) if b is not None else None)


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("fusion", ["probs", "logits"])
@pytest.mark.parametrize("softcap", [None, 3.0])
def test_greedy_equals_reference(impl, fusion, softcap):
    args = _inputs(B=19)  # more rows than one Triton row block
    kw = dict(fusion=fusion, softcap=softcap)
    ref = rectified_decode_head_reference(*args, lam=1.0, **kw)
    out = rectified_decode_head(*args, lam=1.0, impl=impl, **kw)
    assert out.dtype == torch.int64 and torch.equal(out, ref)
    alone = rectified_decode_head_reference(*args, lam=0.0, **kw)
    assert not torch.equal(ref, alone), "the Copilot changes no greedy token: the test is vacuous"
    lam = torch.linspace(0.0, 2.0, 19)  # per-row lambdas
    assert torch.equal(rectified_decode_head(*args, lam=lam, impl=impl, **kw),
                       rectified_decode_head_reference(*args, lam=lam, **kw))


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_greedy_no_bias_small_tiles_and_ties(impl):
    h, w, gc, a, _ = _inputs(bias=False, V=130)
    assert torch.equal(rectified_decode_head(h, w, gc, a, None, fusion="logits", impl=impl),
                       rectified_decode_head_reference(h, w, gc, a, None, fusion="logits"))
    # duplicated vocabulary rows tie exactly: the lowest id wins, across tiles too
    w2, a2 = torch.cat([w, w]), torch.cat([a, a])
    out = rectified_decode_head(h, w2, gc, a2, None, fusion="logits", impl=impl)
    assert torch.equal(out, rectified_decode_head_reference(h, w, gc, a, None, fusion="logits"))


def test_torch_path_tiles_over_v():
    from tcopilot.kernels.rectified_decode_head.torch_impl import rectified_decode_head_torch

    args = _inputs(V=301)
    for fusion in ("probs", "logits"):
        out = rectified_decode_head_torch(*args, lam=1.0, fusion=fusion, temperature=0.0, top_k=0, top_p=1.0,
                                          generator=None, softcap=None, block_v=64)
        assert torch.equal(out, rectified_decode_head_reference(*args, fusion=fusion))


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("fusion", ["probs", "logits"])
def test_sampling_with_seed_equals_reference(impl, fusion):
    args = _inputs(B=6)
    kw = dict(lam=1.0, fusion=fusion, temperature=0.8, top_k=40, top_p=0.9)
    ref = rectified_decode_head_reference(*args, generator=torch.Generator().manual_seed(7), **kw)
    out = rectified_decode_head(*args, generator=torch.Generator().manual_seed(7), impl=impl, **kw)
    assert torch.equal(out, ref)
    z, f = decode_head_logits_reference(*args)
    assert torch.equal(ref, rectified_next_token_reference(z, f, generator=torch.Generator().manual_seed(7), **kw))


def test_bf16_inputs_triton_greedy_matches_reference():
    args = _inputs(dtype=torch.bfloat16)
    for fusion in ("probs", "logits"):
        ref = rectified_decode_head_reference(*args, fusion=fusion)
        assert torch.equal(rectified_decode_head(*args, fusion=fusion, impl="triton"), ref)


def test_bad_inputs_raise():
    h, w, gc, a, b = _inputs()
    with pytest.raises(ValueError, match="lm_head"):
        rectified_decode_head(h, w[:, :3], gc, a, b)
    with pytest.raises(ValueError, match="copilot_hidden"):
        rectified_decode_head(h, w, gc[:2], a, b)
    with pytest.raises(ValueError, match="error_out_weight"):
        rectified_decode_head(h, w, gc, a[:10], b)
    with pytest.raises(ValueError, match="error_out_bias"):
        rectified_decode_head(h, w, gc, a, b[:10])
    with pytest.raises(ValueError, match="top_p"):
        rectified_decode_head(h, w, gc, a, b, temperature=1.0, top_p=0.0)
    with pytest.raises(ValueError, match="lam"):
        rectified_decode_head(h, w, gc, a, b, lam=float("nan"))
    with pytest.raises(ValueError, match="softcap"):
        rectified_decode_head(h, w, gc, a, b, softcap=-1.0)
    with pytest.raises(ValueError, match="fusion"):
        rectified_decode_head(h, w, gc, a, b, fusion="sum")


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("fusion", ["probs", "logits"])
def test_greedy_odd_sizes_strided_inputs_scalar_lam(impl, fusion):
    # what generate() passes: h = hidden[:, -1] and g = copilot(...)[:, -1] are strided views; also one row;
    # sizes that fill no tile exactly; a 0-d lambda tensor; the Gemma-2 soft-cap
    gen = torch.Generator().manual_seed(5)
    h3, w, g3, a, b = (torch.randn(2, 3, 63, generator=gen), torch.randn(1000, 63, generator=gen) * 0.3,
                       torch.randn(2, 3, 17, generator=gen), torch.randn(1000, 17, generator=gen) * 0.05,
                       torch.randn(1000, generator=gen) * 0.01)
    h, g = h3[:, -1], g3[:, -1]
    assert not h.is_contiguous() and not g.is_contiguous()
    for lam, softcap in ((torch.tensor(0.7), None), (1.0, 2.5)):
        kw = dict(lam=lam, fusion=fusion, softcap=softcap)
        ref = rectified_decode_head_reference(h, w, g, a, b, **kw)
        assert torch.equal(rectified_decode_head(h, w, g, a, b, impl=impl, **kw), ref)
        assert torch.equal(rectified_decode_head(h[1:], w, g[1:], a, b, impl=impl, **kw), ref[1:])


def test_fp16_and_mixed_dtype_inputs_triton_greedy_match_reference():
    h, w, gc, a, b = _inputs(B=7, V=257)
    for fusion in ("probs", "logits"):
        half = [t.half() for t in (h, w, gc, a, b)]
        assert torch.equal(rectified_decode_head(*half, fusion=fusion, impl="triton"),
                           rectified_decode_head_reference(*half, fusion=fusion))
        # fp32 hidden states with bf16 weights (an upcast Pilot output against a bf16 head)
        mixed = (h, w.bfloat16(), gc, a.bfloat16(), b)
        assert torch.equal(rectified_decode_head(*mixed, fusion=fusion, impl="triton"),
                           rectified_decode_head_reference(*mixed, fusion=fusion))
