"""rectified_decode_head with the Pilot's LM-head bias (``lm_head_bias``: Phi, GPT-J, CodeGen): the tiled PyTorch
path and the Triton kernel (interpreter on CPU) against the reference, ``z = h W^T + c`` before the soft-cap.

The bias is drawn as large as the spread of ``z`` (std ~1.8 here), so that dropping it, adding it after the
soft-cap or reading the wrong entries changes the chosen tokens; each test checks that it does (non-vacuous).
Sizes are odd as in ``test_rectified_decode_head.py``: V=203 fills no BLOCK_V=64 tile, d=37 and c=45 no BLOCK_K=32
slice, B=19 spans two BLOCK_B=16 row blocks of the interpreter's configuration.
"""

import pytest
import torch

from tcopilot.kernels.rectified_decode_head import rectified_decode_head, rectified_decode_head_reference
from tcopilot.kernels.rectified_decode_head.reference import decode_head_logits_reference
from tcopilot.kernels.rectified_decode_head.triton_impl import decode_head_products_triton

D, C, V = 37, 45, 203


def _inputs(B, dtype=torch.float32, seed=0):
    """``(h, W, g, A, b, c)``: the Copilot's bias ``b`` small, the Pilot's ``c`` of the size of ``z``'s spread."""
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(B, D, generator=gen)
    w = torch.randn(V, D, generator=gen) * 0.3
    g = torch.randn(B, C, generator=gen)
    a = torch.randn(V, C, generator=gen) * 0.15  # f of std ~1: the Copilot moves tokens too
    b = torch.randn(V, generator=gen) * 0.01
    c = torch.randn(V, generator=gen) * 1.5
    return tuple(t.to(dtype) for t in (h, w, g, a, b, c))


# Copilot weight per fusion: next to p = softmax(z) (entries <= 1) a Copilot of f's size (std ~1) would decide
# alone, and the Pilot's bias would change nothing
LAM = {"logits": 1.0, "probs": 0.05}


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("B", [1, 19])
def test_greedy_with_lm_head_bias_equals_reference(impl, dtype, B):
    h, w, g, a, b, c = _inputs(B, dtype)
    for fusion in ("probs", "logits"):
        moved = False
        # with and without the Copilot's bias and the soft-cap; per-row lambdas once
        for bias, softcap, lam in ((b, None, 1.0), (None, 2.0, 1.0), (b, 3.0, torch.linspace(0.0, 2.0, B))):
            kw = dict(lam=lam * LAM[fusion], fusion=fusion, softcap=softcap)
            ref = rectified_decode_head_reference(h, w, g, a, bias, lm_head_bias=c, **kw)
            out = rectified_decode_head(h, w, g, a, bias, lm_head_bias=c, impl=impl, **kw)
            assert out.dtype == torch.int64 and torch.equal(out, ref), (fusion, softcap)
            moved |= not torch.equal(ref, rectified_decode_head_reference(h, w, g, a, bias, **kw))
        assert moved, f"{fusion}: the Pilot's bias changes no greedy token: the test is vacuous"


def test_reference_adds_the_bias_before_the_softcap():
    # the oracle itself: z = cap * tanh((h W^T + c) / cap), what the Pilot's head followed by Gemma-2 capping gives
    h, w, g, a, b, c = _inputs(5)
    z, f = decode_head_logits_reference(h, w, g, a, b, 2.0, lm_head_bias=c)
    torch.testing.assert_close(z, 2.0 * torch.tanh((h @ w.t() + c) / 2.0))
    torch.testing.assert_close(f, g @ a.t() + b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, "mixed"])
def test_triton_products_with_lm_head_bias(dtype):
    h, w, g, a, b, c = _inputs(19, torch.float32 if dtype == "mixed" else dtype)
    if dtype == "mixed":  # fp32 hidden states, bf16 weights, an fp32 Pilot bias and an fp16 Copilot bias
        w, a, b = w.bfloat16(), a.bfloat16(), b.half()
    tol = dict(rtol=1e-5, atol=1e-5) if h.dtype == torch.float32 else dict(rtol=1e-4, atol=1e-4)
    for bias, softcap in ((b, None), (None, 2.0)):
        z, f = decode_head_products_triton(h, w, g, a, bias, softcap, lm_head_bias=c)
        z_ref, f_ref = decode_head_logits_reference(h, w, g, a, bias, softcap, lm_head_bias=c)
        torch.testing.assert_close(z, z_ref, **tol)
        torch.testing.assert_close(f, f_ref, **tol)
    # a row block of 32 and a single K slice: the bias is read per vocabulary tile whatever the tiling
    z, _ = decode_head_products_triton(h, w, g, a, b, None, lm_head_bias=c,
                                       config=dict(BLOCK_B=32, BLOCK_V=32, BLOCK_K=64, num_warps=4, num_stages=1))
    z_plain, _ = decode_head_products_triton(h, w, g, a, b, None)
    torch.testing.assert_close(z - z_plain, c.float().expand_as(z), **tol)


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("fusion", ["probs", "logits"])
def test_sampling_with_lm_head_bias_draws_like_the_reference(impl, fusion):
    # as test_rectified_decode_head.py's sampling tests: for the same generator state the head draws what the
    # reference procedure (rectified_next_token_reference of the materialised z, f) draws
    h, w, g, a, b, c = _inputs(4)
    kw = dict(lam=LAM[fusion], fusion=fusion, temperature=0.8, top_k=40, top_p=0.9, softcap=2.5)
    outs, unbiased = [], []
    for seed in (7, 8):
        ref = rectified_decode_head_reference(h, w, g, a, b, lm_head_bias=c,
                                              generator=torch.Generator().manual_seed(seed), **kw)
        out = rectified_decode_head(h, w, g, a, b, lm_head_bias=c, impl=impl,
                                    generator=torch.Generator().manual_seed(seed), **kw)
        assert torch.equal(out, ref)
        outs.append(out)
        unbiased.append(rectified_decode_head_reference(h, w, g, a, b, generator=torch.Generator().manual_seed(seed),
                                                        **kw))
    assert not torch.equal(outs[0], outs[1]), "the seed changes no draw: the test is vacuous"
    assert not torch.equal(torch.stack(outs), torch.stack(unbiased)), "the Pilot's bias changes no draw: vacuous"


def test_lm_head_bias_validation():
    h, w, g, a, b, c = _inputs(3)
    bad = [
        (c[:-1], r"lm_head_bias: expected shape \[203\], got \[202\]"),
        (c[None], r"lm_head_bias: expected a 1-d tensor, got shape \(1, 203\)"),
        (torch.zeros(V, dtype=torch.int64), r"lm_head_bias: expected dtype in \(.*float32.*\), got int64"),
        (c.to("meta"), r"lm_head_bias: expected a tensor on cpu \(like the other inputs\), got meta"),
        (c.tolist(), r"lm_head_bias: expected a torch.Tensor, got list"),
    ]
    for value, match in bad:
        with pytest.raises(ValueError, match=match):
            rectified_decode_head(h, w, g, a, b, lm_head_bias=value)
    # keyword only: a sixth positional tensor is not silently read as the Pilot's bias
    with pytest.raises(TypeError):
        rectified_decode_head(h, w, g, a, b, c)
    # any float dtype, as the Copilot's bias: an fp64 Pilot bias against fp32 weights is read in fp32
    out = rectified_decode_head(h, w, g, a, b, lm_head_bias=c.double(), impl="torch")
    assert torch.equal(out, rectified_decode_head_reference(h, w, g, a, b, lm_head_bias=c))
