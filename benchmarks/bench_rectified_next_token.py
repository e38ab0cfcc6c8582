"""Speed of ``rectified_next_token`` (rectify the Pilot's distribution with the Copilot's output, then pick).

Providers: ``naive`` (an eager sampler as generation loops write it: ``softmax(z) + lam * f``, clamp, log,
temperature, ``topk`` mask, Hugging Face-style top-p through a full sort and ``cumsum``,
``torch.multinomial``), ``compile`` (``torch.compile`` of it), ``torch`` and ``triton``
(``tcopilot.rectified_next_token(impl=...)``; greedy runs its split-row kernels, many programs per row), in
greedy mode ``triton_rowwise``: the Triton one-program-per-row kernel forced (``split=False``), to measure the two
designs side by side, and in the sampling modes ``triton_seed``: ``impl="triton"`` with ``seed=`` (Philox numbers
made in the kernel instead of a ``torch.rand([B, V])`` drawn, written and read again).

The Triton sampling rows also record ``vocab_passes``: how many times the kernel walked the vocabulary, mean
over the batch (Pilot statistics, fused statistics, each threshold-search pass and gather, the race when it is a pass
of its own), shown next to the provider in the report: the time over one read of the inputs is about this count.

Modes: ``greedy`` (temperature 0), ``topk_topp`` (temperature 0.8, top-k 50, top-p 0.9) and ``topp``
(temperature 1, top-p 0.9: the full-vocabulary sort path).

Work model: memory-bound; bytes = one read of ``z`` and ``f`` (``B * V`` each, in their dtype) plus the
``B`` token ids written. GPU inputs are bf16 (as an LM head returns them), CPU inputs fp32.

Decode head (group ``rectified_decode_head``): ``tcopilot.rectified_decode_head`` from the hidden states, i.e.
both LM-head products ``z = h W^T`` and ``f = g A^T + b`` and then the choice (``fusion="probs"``, no
soft-cap). Providers: ``naive`` (two separate GEMVs, torch matmuls in the weights' dtype, then
``rectified_next_token(impl="auto")``: the Triton sampler on CUDA), ``torch`` and ``triton``
(``rectified_decode_head(impl=...)``). Modes ``greedy`` and ``topk_topp``. GPU: V=128256, d = c = 2048
(a Llama-3.2-1B head and a Copilot head of the same width), bf16, B = 1 and 64 (128: full scope); CPU: V=32000,
d = c = 256, fp32. Work model (memory-bound): each weight read once (``V * (d + c)`` elements in their dtype),
the bias and the hidden states once, the ``[B, V]`` fp32 scratch of ``z`` and ``f`` written once and read once
(``16 * B * V`` bytes), the ``B`` ids written.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from benchutil import (
    CHECK_TOL,
    DEVICE,
    ON_GPU,
    SCOPE,
    OneSlot,
    case,
    dtype_name,
    need_compile,
    need_triton,
    release,
    run_bench,
    set_group,
    timed_first_call,
)

from tcopilot import rectified_decode_head, rectified_next_token
from tcopilot.kernels.rectified_decode_head.reference import decode_head_logits_reference
from tcopilot.kernels.rectified_next_token import rectified_probs_reference

LAM = 1.0
MODES = {
    "greedy": dict(temperature=0.0, top_k=0, top_p=1.0),
    "topk_topp": dict(temperature=0.8, top_k=50, top_p=0.9),
    "topp": dict(temperature=1.0, top_k=0, top_p=0.9),
}
PROVIDERS = ["naive", "torch", "triton", "compile"]


@dataclass(frozen=True)
class Shape:
    batch: int
    vocab: int
    dtype: torch.dtype

    @property
    def id(self) -> str:
        return f"B{self.batch}-V{self.vocab}"


CPU_SHAPES = [Shape(b, 32000, torch.float32) for b in (1, 8)]
GPU_SHAPES = [Shape(b, v, torch.bfloat16) for v in (128256, 151936) for b in (1, 32, 128)]
GPU_FULL_ONLY = {s for s in GPU_SHAPES if s.vocab == 151936}


def _grid(cpu_shapes, gpu_shapes, modes, providers, full_only, prefix=""):
    """pytest params ``(shape, mode, provider)`` over shapes x modes x providers, CPU shapes then GPU ones."""
    out = []
    for gpu, shapes in ((False, cpu_shapes), (True, gpu_shapes)):
        for shape in shapes:
            for mode in modes:
                for prov in providers:
                    cid = f"{prefix}{shape.id}-{dtype_name(shape.dtype)}-{mode}-{prov}"
                    out.append(case((shape, mode, prov), id=cid, gpu=gpu, full=shape in full_only, provider=prov))
    return out


def _cases():
    rowwise = _grid([], GPU_SHAPES, ["greedy"], ["triton_rowwise"], GPU_FULL_ONLY)  # Triton: GPU only anyway
    # seed= draws: a kernel variant of its own to compile, no issue target: full scope only
    seeded = _grid([], GPU_SHAPES, ["topk_topp", "topp"], ["triton_seed"], set(GPU_SHAPES))
    return _grid(CPU_SHAPES, GPU_SHAPES, MODES, PROVIDERS, GPU_FULL_ONLY) + rowwise + seeded


def eager_sample(z, f, lam: float, temperature: float, top_k: int, top_p: float):
    """The plain-PyTorch sampler (paper Eq. 8 with the usual top-k / top-p warpers)."""
    p = torch.softmax(z.float(), dim=-1) + lam * f.float()
    if temperature == 0:
        return p.argmax(dim=-1)
    logits = torch.log(p.clamp(min=0.0)) / temperature
    if top_k > 0:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=False)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cum <= 1 - top_p
        drop[:, -1:] = False  # always keep the most likely token
        logits = logits.scatter(1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return torch.multinomial(logits.softmax(dim=-1), 1).squeeze(1)


def make_inputs(shape: Shape):
    g = torch.Generator(device=DEVICE).manual_seed(0)
    z = (torch.randn(shape.batch, shape.vocab, device=DEVICE, generator=g) * 3).to(shape.dtype)
    # The Copilot's correction: small, of both signs, like a trained error predictor's output.
    f = (torch.randn(shape.batch, shape.vocab, device=DEVICE, generator=g) * 1e-5).to(shape.dtype)
    return z, f


_compiled = None
INPUTS = OneSlot()


@pytest.fixture(autouse=True, scope="module")
def _release_module_state():
    yield
    release(INPUTS, HEAD_INPUTS)


@pytest.mark.parametrize(("shape", "mode", "provider"), _cases())
def test_rectified_next_token_speed(benchmark, shape: Shape, mode: str, provider: str):
    global _compiled
    opts = MODES[mode]
    z, f = INPUTS.get(shape, lambda: make_inputs(shape))
    if provider == "naive":
        fn = lambda: eager_sample(z, f, LAM, **opts)  # noqa: E731
    elif provider == "compile":
        need_compile()
        if _compiled is None:
            _compiled = torch.compile(eager_sample)
        fn = lambda: _compiled(z, f, LAM, **opts)  # noqa: E731
    elif provider == "triton_rowwise":
        need_triton("rectified_next_token")
        from tcopilot.kernels.rectified_next_token.triton_impl import rectified_next_token_triton

        fn = lambda: rectified_next_token_triton(z, f, lam=LAM, split=False, **opts)  # noqa: E731
    elif provider == "triton_seed":
        need_triton("rectified_next_token")
        fn = lambda: rectified_next_token(z, f, lam=LAM, seed=1234, impl="triton", **opts)  # noqa: E731
    else:
        if provider == "triton":
            need_triton("rectified_next_token")
        fn = lambda: rectified_next_token(z, f, lam=LAM, impl=provider, **opts)  # noqa: E731

    # Correctness first, untimed: greedy picks the reference's token; a sampled token must lie in the
    # support of the reference distribution (for the eager warpers, whose top-p boundary rule differs from
    # ours by ties, the support before top-p).
    tokens = timed_first_call(fn, provider)[0] if provider == "compile" else fn()
    exact_support = provider in ("torch", "triton", "triton_rowwise", "triton_seed") or mode == "greedy"
    ref_opts = dict(opts) if exact_support else dict(opts, top_p=1.0)
    probs = rectified_probs_reference(z, f, lam=LAM, **ref_opts)
    if mode == "greedy":
        same = torch.equal(tokens, probs.argmax(dim=-1))
        assert same, f"{provider}: greedy tokens differ from the reference"
    else:
        picked = probs.gather(1, tokens[:, None])
        assert bool((picked > 0).all()), f"{provider}: sampled a token outside the reference's support"
    del probs

    info = {}
    if provider in ("triton", "triton_seed") and mode != "greedy" and SCOPE == "full":  # (one more compile)
        from tcopilot.kernels.rectified_next_token.triton_impl import rectified_next_token_triton

        _, passes = rectified_next_token_triton(z, f, lam=LAM, seed=1234, return_search_passes=True, **opts)
        # probs fusion: Pilot statistics + fused statistics + the searches (+ the race, unless a gather ran it)
        info["vocab_passes"] = round(2 + passes.sum(dim=1).float().mean().item(), 2)
    elt = torch.finfo(shape.dtype).bits // 8
    nbytes = 2 * shape.batch * shape.vocab * elt + 8 * shape.batch
    set_group(benchmark, "rectified_next_token", shape.id, shape.dtype, mode, provider,
              batch=shape.batch, vocab=shape.vocab, **opts, **info)
    run_bench(benchmark, fn, nbytes=nbytes, bound="memory", rounds=30 if ON_GPU else None)


# ----------------------------------------------------------------------------------------------- decode head


@dataclass(frozen=True)
class HeadShape:
    batch: int
    vocab: int
    d: int
    c: int
    dtype: torch.dtype

    @property
    def id(self) -> str:
        return f"B{self.batch}-V{self.vocab}-d{self.d}-c{self.c}"


HEAD_CPU_SHAPES = [HeadShape(b, 32000, 256, 256, torch.float32) for b in (1, 8)]
HEAD_GPU_SHAPES = [HeadShape(b, 128256, 2048, 2048, torch.bfloat16) for b in (1, 64, 128)]
HEAD_GPU_FULL_ONLY = {s for s in HEAD_GPU_SHAPES if s.batch == 128}
HEAD_MODES = {k: MODES[k] for k in ("greedy", "topk_topp")}
HEAD_PROVIDERS = ["naive", "torch", "triton"]
HEAD_INPUTS = OneSlot()


def _head_cases():
    return _grid(HEAD_CPU_SHAPES, HEAD_GPU_SHAPES, HEAD_MODES, HEAD_PROVIDERS, HEAD_GPU_FULL_ONLY, prefix="head-")


def make_head_inputs(shape: HeadShape):
    """Hidden states, both heads, the bias, and the fp32 reference products (for the checks, untimed)."""
    g = torch.Generator(device=DEVICE).manual_seed(0)

    def randn(*size, scale=1.0):
        return (torch.randn(*size, device=DEVICE, generator=g) * scale).to(shape.dtype)

    h = randn(shape.batch, shape.d)
    w = randn(shape.vocab, shape.d, scale=3.0 / shape.d**0.5)  # Pilot logits of std ~3
    gc = randn(shape.batch, shape.c)
    a = randn(shape.vocab, shape.c, scale=1e-4 / shape.c**0.5)  # a small correction, both signs
    b = randn(shape.vocab, scale=1e-5)
    z_ref, f_ref = decode_head_logits_reference(h, w, gc, a, b)
    return (h, w, gc, a, b), (z_ref, f_ref)


def two_gemvs_then_sample(h, w, gc, a, b, **opts):
    """The unfused way: both products as torch matmuls in the weights' dtype, then the sampler."""
    z = h @ w.t()
    f = torch.addmm(b, gc, a.t())
    return rectified_next_token(z, f, lam=LAM, fusion="probs", impl="auto", **opts)


def head_bytes(shape: HeadShape) -> int:
    """The byte model of one call (module docstring): weights, bias and hidden states once, the scratch."""
    elt = torch.finfo(shape.dtype).bits // 8
    weights = shape.vocab * (shape.d + shape.c) * elt
    small = shape.vocab * elt + shape.batch * (shape.d + shape.c) * elt + 8 * shape.batch
    scratch = 2 * shape.batch * shape.vocab * 4 * 2  # z and f, fp32, written once and read once
    return weights + small + scratch


@pytest.mark.parametrize(("shape", "mode", "provider"), _head_cases())
def test_rectified_decode_head_speed(benchmark, shape: HeadShape, mode: str, provider: str):
    opts = HEAD_MODES[mode]
    args, (z_ref, f_ref) = HEAD_INPUTS.get(shape, lambda: make_head_inputs(shape))
    if provider == "naive":
        fn = lambda: two_gemvs_then_sample(*args, **opts)  # noqa: E731
    else:
        if provider == "triton":
            need_triton("rectified_decode_head")  # its module imports the sampler's kernel too
        fn = lambda: rectified_decode_head(*args, lam=LAM, fusion="probs", impl=provider, **opts)  # noqa: E731

    # Correctness first, untimed, against the fp32 reference products. Ours: greedy is the reference's token,
    # a sampled token lies in the support of the reference distribution. The naive way rounds z and f to the
    # weights' dtype: its greedy token must score within that rounding of the best, its samples lie in the
    # support before top-k / top-p (whose boundary the rounding moves).
    tokens = fn()
    if mode == "greedy":
        fused = torch.softmax(z_ref, dim=-1) + LAM * f_ref
        if provider == "naive":
            gap = fused.max(dim=-1).values - fused.gather(1, tokens[:, None]).squeeze(1)
            tol = CHECK_TOL[shape.dtype] * fused.abs().amax(dim=-1)
            assert bool((gap <= tol).all()), "naive: greedy tokens score below the reference's best"
        else:
            assert torch.equal(tokens, fused.argmax(dim=-1)), f"{provider}: greedy tokens differ from the reference"
        del fused
    else:
        ref_opts = dict(opts) if provider != "naive" else dict(opts, top_k=0, top_p=1.0)
        probs = rectified_probs_reference(z_ref, f_ref, lam=LAM, **ref_opts)
        picked = probs.gather(1, tokens[:, None])
        assert bool((picked > 0).all()), f"{provider}: sampled a token outside the reference's support"
        del probs

    set_group(benchmark, "rectified_decode_head", shape.id, shape.dtype, mode, provider, batch=shape.batch,
              vocab=shape.vocab, d=shape.d, c=shape.c, **opts)
    run_bench(benchmark, fn, nbytes=head_bytes(shape), bound="memory", rounds=30 if ON_GPU else None)
