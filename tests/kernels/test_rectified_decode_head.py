"""rectified_decode_head: tiled PyTorch path and Triton kernel (interpreter on CPU) against the reference."""

import pytest
import torch

from tcopilot.kernels.rectified_decode_head import rectified_decode_head, rectified_decode_head_reference
from tcopilot.kernels.rectified_decode_head.reference import decode_head_logits_reference
from tcopilot.kernels.rectified_decode_head.triton_impl import _config, decode_head_products_triton
from tcopilot.kernels.rectified_next_token import rectified_next_token, rectified_next_token_reference


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
    # duplicated vocabulary rows tie exactly: the lowest id wins, across tiles too. Small dyadic values keep every
    # product exact: with random floats the two copies' logits can differ in the last bit, because a CPU GEMM's
    # summation order may depend on where a row sits in its tile (seen on AMD EPYC).
    g = torch.Generator().manual_seed(3)

    def ints(*shape):
        return torch.randint(-4, 5, shape, generator=g).float()

    h, w, gc, a = ints(5, 24), ints(130, 24) / 4, ints(5, 40), ints(130, 40) / 64
    w2, a2 = torch.cat([w, w]), torch.cat([a, a])
    out = rectified_decode_head(h, w2, gc, a2, None, fusion="logits", impl=impl)
    want = rectified_decode_head_reference(h, w, gc, a, None, fusion="logits")
    assert torch.equal(out, want) and (want < 130).all()


def test_products_large_softcap_keep_fp32_accuracy():
    # cap * tanh(z / cap) with a cap far above z is ~z: the head must keep z's fp32 accuracy there (the
    # 2 / (1 + exp(-2x)) - 1 form it had lost ~cap * 6e-8 on every logit: 6e-4 at this cap).
    args = _inputs(V=300)
    z, _ = decode_head_products_triton(*args, softcap=1e4)
    h, w = args[0].double(), args[1].double()
    want = 1e4 * torch.tanh((h @ w.T) / 1e4)
    torch.testing.assert_close(z.double(), want, rtol=1e-6, atol=1e-6)


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


# ---------------------------------------------------------------------------------------------------------
# Triton path: the products kernel (grid over vocabulary x row blocks, [B, V] fp32 scratch) and the Triton
# sampler on that scratch. Sizes are odd on purpose: V=203 fills no BLOCK_V=64 tile, d=37 and c=45 no
# BLOCK_K=32 slice, and B=19 spans two BLOCK_B=16 row blocks in the interpreter.
# ---------------------------------------------------------------------------------------------------------

ODD = dict(d=37, c=45, V=203)


def _strided(t):
    """The same values in a view whose row stride is not its row length (and not contiguous)."""
    wide = torch.full((t.shape[0], t.shape[1] + 7), float("nan"), dtype=t.dtype)
    wide[:, 3:3 + t.shape[1]] = t
    view = wide[:, 3:3 + t.shape[1]]
    assert not view.is_contiguous() and view.stride(0) == t.shape[1] + 7
    return view


def _tol(dtype):
    # the products of 16-bit values are exact in fp32: only the summation order differs from the reference
    return dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, "mixed"])
@pytest.mark.parametrize("B", [1, 5, 19])
def test_triton_products_equal_reference(dtype, B):
    h, w, gc, a, b = _inputs(B=B, **ODD, dtype=torch.float32 if dtype == "mixed" else dtype)
    if dtype == "mixed":  # fp32 hidden states against 16-bit weights: cast in registers, no copy
        w, a = w.bfloat16(), a.half()
    for bias, softcap in ((b, None), (None, 2.0)):
        z, f = decode_head_products_triton(h, w, gc, a, bias, softcap)
        z_ref, f_ref = decode_head_logits_reference(h, w, gc, a, bias, softcap)
        assert z.dtype == f.dtype == torch.float32 and z.shape == f.shape == (B, 203)
        torch.testing.assert_close(z, z_ref, **_tol(h.dtype))
        torch.testing.assert_close(f, f_ref, **_tol(h.dtype))
    # a bigger row block (what the CUDA table picks for B > 16) and one of a single K slice
    for cfg in (dict(BLOCK_B=32, BLOCK_V=32, BLOCK_K=64), dict(BLOCK_B=16, BLOCK_V=128, BLOCK_K=16)):
        z, f = decode_head_products_triton(h, w, gc, a, b, 3.0, config=dict(cfg, num_warps=4, num_stages=1))
        z_ref, f_ref = decode_head_logits_reference(h, w, gc, a, b, 3.0)
        torch.testing.assert_close(z, z_ref, **_tol(h.dtype))
        torch.testing.assert_close(f, f_ref, **_tol(h.dtype))


@pytest.mark.parametrize("B", [1, 19])
def test_triton_products_softmax_partials(B):
    """The per-block (max, sum exp, argmax) of z that the products kernel writes for the sampler (its pass over z
    skipped) equal those computed from the z it wrote; row blocks of 16 and a partial last vocabulary block."""
    h, w, gc, a, b = _inputs(B=B, **ODD)
    cfg = dict(BLOCK_B=16, BLOCK_V=32, BLOCK_K=32, num_warps=4, num_stages=1)
    z, f, (pm, ps, pa) = decode_head_products_triton(h, w, gc, a, b, 2.0, config=cfg, with_stats=True)
    assert torch.equal(z, decode_head_products_triton(h, w, gc, a, b, 2.0, config=cfg)[0])
    n_vb = -(-z.shape[1] // 32)
    assert pm.shape == ps.shape == pa.shape == (B, n_vb) and pa.dtype == torch.int64
    blocks = torch.nn.functional.pad(z, (0, n_vb * 32 - z.shape[1]), value=float("-inf")).view(B, n_vb, 32)
    want_m, want_arg = blocks.max(-1)
    torch.testing.assert_close(pm, want_m, rtol=0, atol=0)
    torch.testing.assert_close(ps, (blocks - want_m[..., None]).exp().sum(-1), rtol=1e-6, atol=0)
    assert torch.equal(pa, want_arg + 32 * torch.arange(n_vb))


def test_triton_products_strided_rows_are_bitwise_equal():
    h, w, gc, a, b = _inputs(B=5, **ODD)
    z, f = decode_head_products_triton(h, w, gc, a, b, 2.0)
    zs, fs = decode_head_products_triton(_strided(h), _strided(w), _strided(gc), _strided(a), b, 2.0)
    assert torch.equal(z, zs) and torch.equal(f, fs)
    # column-strided (transposed storage) weights read the same values too
    zt, ft = decode_head_products_triton(h, w.t().contiguous().t(), gc, a.t().contiguous().t(), b, 2.0)
    assert torch.equal(z, zt) and torch.equal(f, ft)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("fusion", ["probs", "logits"])
@pytest.mark.parametrize("B", [1, 5, 19])
def test_triton_greedy_equals_reference_odd_sizes(dtype, fusion, B):
    h, w, gc, a, b = _inputs(B=B, **ODD, dtype=dtype)
    a = a * 8  # f of std ~1, so the Copilot also moves argmax(z + lam f) of a single row
    lam_rows = torch.linspace(0.0, 2.0, B)
    changed = False
    for bias, softcap, lam in ((b, None, 1.0), (None, 2.0, lam_rows), (b, 3.0, torch.tensor(0.5))):
        kw = dict(fusion=fusion, softcap=softcap)
        ref = rectified_decode_head_reference(h, w, gc, a, bias, lam=lam, **kw)
        out = rectified_decode_head(h, w, gc, a, bias, lam=lam, impl="triton", **kw)
        assert out.dtype == torch.int64 and torch.equal(out, ref)
        changed |= not torch.equal(ref, rectified_decode_head_reference(h, w, gc, a, bias, lam=0.0, **kw))
    assert changed, "the Copilot changes no greedy token: the test is vacuous"


@pytest.mark.parametrize("fusion", ["probs", "logits"])
@pytest.mark.parametrize("B", [1, 5, 19])
def test_triton_sampling_draws_like_the_triton_sampler(fusion, B):
    # the head's tokens are rectified_next_token(z_ref, f_ref, impl="triton")'s for the same generator state,
    # with top-k / top-p, per-row lambdas, a bias and a soft-cap
    h, w, gc, a, b = _inputs(B=B, **ODD)
    z_ref, f_ref = decode_head_logits_reference(h, w, gc, a, b, 2.5)
    lam = torch.linspace(0.5, 1.5, B)
    draws = []
    all_opts = (dict(temperature=0.9), dict(temperature=0.7, top_k=20, top_p=0.8), dict(temperature=1.3, top_p=0.6))
    # B=19 is there for the products' second row block; the sampler's filters (slow in the interpreter, one
    # program per row) are covered by the smaller batches
    for opts in all_opts[:1] if B > 16 else all_opts:
        kw = dict(lam=lam, fusion=fusion, **opts)
        for seed in (7, 8):
            out = rectified_decode_head(h, w, gc, a, b, softcap=2.5, impl="triton",
                                        generator=torch.Generator().manual_seed(seed), **kw)
            ref = rectified_next_token(z_ref, f_ref, impl="triton", generator=torch.Generator().manual_seed(seed),
                                       **kw)
            assert torch.equal(out, ref)
            draws.append(out)
    assert len({tuple(d.tolist()) for d in draws}) > 1, "every draw is the same: the test is vacuous"


def test_triton_strided_inputs_give_the_same_tokens():
    h, w, gc, a, b = _inputs(B=5, **ODD)
    strided = (_strided(h), _strided(w), _strided(gc), _strided(a), b)
    for kw in (dict(fusion="probs"), dict(fusion="logits", softcap=2.0, lam=torch.linspace(0, 2, 5)),
               dict(fusion="probs", temperature=0.8, top_k=10, top_p=0.9)):
        sampled = "temperature" in kw
        gen = (lambda: dict(generator=torch.Generator().manual_seed(3))) if sampled else dict
        ref = rectified_decode_head(h, w, gc, a, b, impl="triton", **gen(), **kw)
        assert torch.equal(rectified_decode_head(*strided, impl="triton", **gen(), **kw), ref)
        if not sampled:
            assert torch.equal(ref, rectified_decode_head_reference(h, w, gc, a, b, **kw))


def test_triton_config_table():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")  # the table only reads the device kind
    # decode, 16-bit weights: one row block up to B=64, so every weight tile is read by one program
    for bsz, block_b in ((1, 16), (5, 16), (17, 32), (64, 64), (128, 64)):
        cfg = _config(cuda, bsz, True, 2)
        assert cfg["BLOCK_B"] == block_b and cfg["BLOCK_B"] % 16 == 0  # tl.dot's minimum
        assert cfg["num_warps"] == (8 if block_b == 64 else 4)
        smem = cfg["num_stages"] * cfg["BLOCK_K"] * (cfg["BLOCK_V"] + cfg["BLOCK_B"]) * 2
        assert 3 <= cfg["num_stages"] <= 4 and smem <= 96 * 1024
    assert -(-128256 // _config(cuda, 1, True, 2)["BLOCK_V"]) >= 4 * 132  # programs at B=1 vs an H100's SMs
    cast = _config(cuda, 64, False, 4)  # fp32 / mixed: fp32 tiles in registers
    assert cast["BLOCK_B"] == 32 and cast["BLOCK_K"] == 32 and cast["num_warps"] == 8
    assert _config(cpu, 64, True, 2)["BLOCK_B"] == 16  # the interpreter keeps small tiles (B=19: two blocks)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("pilot_bias", [False, True], ids=["", "pilot_bias"])
@pytest.mark.parametrize("B", [1, 64, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_gpu_products_and_greedy_llama_shapes(dtype, B, pilot_bias):
    """The CUDA configuration table (tensor-core tl.dot, pipelined stages) at a Llama-3.2-1B head: V=128256,
    d = c = 2048, hidden states as ``hidden[:, -1]`` views; products against fp32 matmuls of the same values,
    greedy tokens against the reference wherever the best score is not within rounding of the runner-up.
    ``pilot_bias``: the Pilot's head has a bias too (``lm_head_bias``, Phi-style: the HAS_Z_BIAS kernel)."""
    g = torch.Generator(device="cuda").manual_seed(B)
    V, d = 128256, 2048
    hidden = torch.randn(B, 3, d, generator=g, device="cuda").to(dtype)
    h = hidden[:, -1]  # a strided view, as generate passes it
    w = (torch.randn(V, d, generator=g, device="cuda") * 0.02).to(dtype)
    gc = torch.randn(B, d, generator=g, device="cuda").to(dtype)
    a = (torch.randn(V, d, generator=g, device="cuda") * 0.001).to(dtype)
    bias = (torch.randn(V, generator=g, device="cuda") * 0.001).to(dtype)
    c = (torch.randn(V, generator=g, device="cuda") * 0.02).to(dtype) if pilot_bias else None
    z, f = decode_head_products_triton(h, w, gc, a, bias, None, lm_head_bias=c)
    z_ref, f_ref = decode_head_logits_reference(h, w, gc, a, bias, lm_head_bias=c)
    # 16-bit products are exact in fp32: only the summation order of 2048 terms differs
    torch.testing.assert_close(z, z_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(f, f_ref, rtol=1e-4, atol=1e-4)
    for fusion in ("probs", "logits"):
        got = rectified_decode_head(h, w, gc, a, bias, lm_head_bias=c, lam=0.5, fusion=fusion, impl="triton")
        want = rectified_decode_head_reference(h, w, gc, a, bias, lm_head_bias=c, lam=0.5, fusion=fusion)
        fused = (z_ref.softmax(-1) if fusion == "probs" else z_ref) + 0.5 * f_ref
        top2 = fused.topk(2, dim=-1).values
        clear = (top2[:, 0] - top2[:, 1]) > 1e-5 * top2[:, 0].abs().clamp(min=1e-3)
        assert clear.any()
        assert torch.equal(got[clear], want[clear])
