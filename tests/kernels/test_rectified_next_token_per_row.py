"""Public ``rectified_next_token`` with per-row options and Philox seeds, on every implementation.

Per-row ``temperature`` / ``top_k`` / ``top_p`` tensors and ``seed=`` (an int, or a [B] tensor of per-row
seeds) are part of the public API: the oracle computes each row alone with its own numbers, the PyTorch path
vectorises them, the Triton kernels read them per row. ``philox.philox_uniforms`` is the PyTorch copy of the
kernels' in-kernel uniforms; it must agree with them bit for bit, or ``impl="torch"`` and ``impl="triton"``
would return different tokens for one seed. Without CUDA the kernels run under TRITON_INTERPRET=1.
"""

from __future__ import annotations

import os

import torch

_HAS_CUDA = torch.cuda.is_available()
if not _HAS_CUDA:
    os.environ["TRITON_INTERPRET"] = "1"  # must precede the first import of triton / the kernels

import pytest  # noqa: E402

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from tcopilot import rectified_decode_head  # noqa: E402
from tcopilot.kernels.rectified_decode_head import rectified_decode_head_reference  # noqa: E402
from tcopilot.kernels.rectified_next_token import (  # noqa: E402
    rectified_next_token,
    rectified_next_token_reference,
    rectified_probs_reference,
)
from tcopilot.kernels.rectified_next_token.philox import philox_uniforms  # noqa: E402
from tcopilot.kernels.rectified_next_token.triton_split import philox_uniforms as kernel_uniforms  # noqa: E402
from tcopilot.testing import chi2_critical, chi2_statistic  # noqa: E402

DEV = "cuda" if _HAS_CUDA else "cpu"
IMPLS = ["torch", "triton"]


@triton.jit
def _draw_uniforms(seed_ptr, out_ptr, V, PER_ROW: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    tl.store(out_ptr + row * V + offs, kernel_uniforms(seed_ptr, row, offs, PER_ROW), mask=offs < V)


def _inputs(b: int, v: int, seed: int = 0, f_scale: float = 0.05):
    g = torch.Generator().manual_seed(seed)
    z = 2.0 * torch.randn(b, v, generator=g)
    f = f_scale * torch.randn(b, v, generator=g)
    return z.to(DEV), f.to(DEV)


def _per_row_options(v: int):
    """Six rows: greedy, plain sampling, top-k, top-p, both, and k >= V (off) with a tiny temperature."""
    t = torch.tensor([0.0, 1.0, 0.7, 1.3, 0.9, 1e-3], device=DEV)
    k = torch.tensor([5, 0, 7, 0, 20, v + 3], device=DEV)
    p = torch.tensor([0.5, 1.0, 1.0, 0.8, 0.9, 1.0], device=DEV)
    return t, k, p


# ------------------------------------------------------------------------------------------ philox uniforms


@pytest.mark.parametrize("seed", [12345, -7, 2**62 + 99, "per-row"])
def test_philox_uniforms_equal_the_kernels_bit_for_bit(seed):
    b, v = 5, 1000
    per_row = seed == "per-row"
    if per_row:
        seed = torch.tensor([0, 1, -1, 2**40 + 3, 2**63 - 1], device=DEV)
    seeds = seed if per_row else torch.full((b,), seed, dtype=torch.int64, device=DEV)
    got = torch.empty(b, v, device=DEV)
    _draw_uniforms[(b,)](seeds, got, v, PER_ROW=per_row, BLOCK=1024)
    want = philox_uniforms(seed, b, v, DEV)
    assert torch.equal(got, want)
    assert 0.0 <= want.min() and want.max() < 1.0 and want.std() > 0.25  # uniform-looking, not constant


def test_philox_uniforms_known_values_and_layout():
    # Pinned values: a change of the counter layout or of the float conversion must be deliberate.
    u = philox_uniforms(0, 2, 3, "cpu")
    assert u.dtype == torch.float32 and u.shape == (2, 3)
    assert u.tolist() == philox_uniforms(torch.tensor([0, 0]), 2, 3, "cpu")[:1].tolist() + u[1:].tolist()
    # a shared seed keys every row alike but counts rows; per-row seeds count nothing but the token id
    per_row = philox_uniforms(torch.tensor([0, 0]), 2, 3, "cpu")
    assert torch.equal(per_row[0], per_row[1]) and not torch.equal(u[0], u[1])
    assert torch.equal(u[0], per_row[0])  # row 0's counter is (id, 0) either way
    assert not torch.equal(philox_uniforms(1, 1, 64, "cpu"), philox_uniforms(2**32 + 1, 1, 64, "cpu"))  # high key


# ------------------------------------------------------------------------------------------ per-row options


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("fusion", ["probs", "logits"])
def test_per_row_options_match_reference_token_for_token(impl, fusion):
    z, f = _inputs(6, 300, seed=1)
    t, k, p = _per_row_options(300)
    lam = torch.linspace(0.0, 2.0, 6, device=DEV)
    for _ in range(3):  # several draws: the generator advances identically in both
        for randomness in (dict(generator=torch.Generator(device=DEV).manual_seed(5)), dict(seed=99),
                           dict(seed=torch.arange(6, device=DEV) * 1000 + 7)):  # fmt: skip
            kw = dict(lam=lam, fusion=fusion, temperature=t, top_k=k, top_p=p)
            want = rectified_next_token_reference(z, f, **kw, **_clone(randomness))
            got = rectified_next_token(z, f, impl=impl, **kw, **_clone(randomness))
            assert torch.equal(got, want), (randomness, got, want)
            probs = rectified_probs_reference(z, f, **kw)
            assert bool((probs.gather(1, got[:, None]) > 0).all())
        z = z.roll(17, dims=1)


def _clone(randomness: dict) -> dict:
    g = randomness.get("generator")
    if g is None:
        return dict(randomness)
    return dict(generator=torch.Generator(device=DEV).set_state(g.get_state()))


def test_reference_per_row_is_each_row_alone():
    z, f = _inputs(6, 50, seed=2)
    t, k, p = _per_row_options(50)
    probs = rectified_probs_reference(z, f, lam=0.5, temperature=t, top_k=k, top_p=p)
    for b in range(6):
        alone = rectified_probs_reference(z[b : b + 1], f[b : b + 1], lam=0.5, temperature=float(t[b]),
                                          top_k=int(k[b]), top_p=float(p[b]))  # fmt: skip
        assert torch.equal(probs[b : b + 1], alone)


@pytest.mark.parametrize("impl", IMPLS)
def test_per_row_tensors_equal_scalar_calls(impl):
    # All rows with one setting: a tensor of equal values gives the scalar call's tokens (same generator use).
    z, f = _inputs(4, 200, seed=3)
    scalar = dict(temperature=0.8, top_k=9, top_p=0.9)
    tensors = dict(temperature=torch.full((4,), 0.8, device=DEV), top_k=torch.full((4,), 9, device=DEV),
                   top_p=torch.full((4,), 0.9, device=DEV))  # fmt: skip
    a = rectified_next_token(z, f, impl=impl, generator=torch.Generator(device=DEV).manual_seed(1), **scalar)
    b = rectified_next_token(z, f, impl=impl, generator=torch.Generator(device=DEV).manual_seed(1), **tensors)
    assert torch.equal(a, b)


@pytest.mark.parametrize("impl", IMPLS)
def test_per_row_seeds_make_rows_independent_of_their_batch(impl):
    z, f = _inputs(5, 300, seed=4)
    seeds = torch.tensor([11, 22, 33, 44, 55], device=DEV)
    kw = dict(lam=1.0, temperature=1.2, top_p=0.95)
    batch = rectified_next_token(z, f, impl=impl, seed=seeds, **kw)
    for b in range(5):
        alone = rectified_next_token(z[b : b + 1], f[b : b + 1], impl=impl, seed=seeds[b : b + 1], **kw)
        assert alone.item() == batch[b].item()
    # reordering the batch reorders the tokens
    perm = torch.tensor([3, 0, 4, 1, 2], device=DEV)
    assert torch.equal(rectified_next_token(z[perm], f[perm], impl=impl, seed=seeds[perm], **kw), batch[perm])
    # the same seed twice gives the same tokens; another seed gives other draws
    assert torch.equal(rectified_next_token(z, f, impl=impl, seed=seeds, **kw), batch)
    draws = {tuple(rectified_next_token(z, f, impl=impl, seed=seeds + s, **kw).tolist()) for s in range(1, 4)}
    assert len(draws) > 1


@pytest.mark.parametrize("impl", IMPLS)
def test_zero_dim_seed_tensor_is_the_int_seed_read_on_the_device(impl):
    # A CUDA graph cannot bake a Python int into a replay: a 0-d tensor seed is the int's stream (counter by row).
    z, f = _inputs(4, 120, seed=5)
    kw = dict(lam=1.0, temperature=1.1, top_k=40, top_p=0.9)
    for seed in (7, 2**63 - 5):
        want = rectified_next_token(z, f, impl=impl, seed=seed, **kw)
        got = rectified_next_token(z, f, impl=impl, seed=torch.tensor(seed, device=DEV), **kw)
        assert torch.equal(got, want)
    assert torch.equal(philox_uniforms(torch.tensor(9), 3, 50, DEV), philox_uniforms(9, 3, 50, DEV))
    # the split-row kernels (no filter) take the same key
    want = rectified_next_token(z, f, impl=impl, seed=11, lam=1.0, temperature=1.0)
    assert torch.equal(rectified_next_token(z, f, impl=impl, seed=torch.tensor(11, device=DEV), lam=1.0,
                                            temperature=1.0), want)  # fmt: skip


def test_seeded_draws_follow_the_distribution():
    # 20000 rows of one distribution, one seed per row: the Philox stream is a sampler, not just a hash.
    n, v = 20000, 12
    g = torch.Generator().manual_seed(21)
    z, f = torch.randn(1, v, generator=g), 0.1 * torch.randn(1, v, generator=g)
    kw = dict(lam=1.0, fusion="probs", temperature=0.8, top_k=8, top_p=0.95)
    probs = rectified_probs_reference(z, f, **kw)[0]
    tokens = rectified_next_token(z.repeat(n, 1), f.repeat(n, 1), seed=torch.arange(n), impl="torch", **kw)
    stat, df = chi2_statistic(tokens, probs)
    assert stat < chi2_critical(df, 1e-6)
    shared = rectified_next_token(z.repeat(n, 1), f.repeat(n, 1), seed=2024, impl="torch", **kw)
    assert chi2_statistic(shared, probs)[0] < chi2_critical(df, 1e-6)


@pytest.mark.parametrize("impl", IMPLS)
def test_decode_head_per_row_options_and_seed(impl):
    g = torch.Generator().manual_seed(6)
    h, w = torch.randn(6, 24, generator=g), 0.3 * torch.randn(300, 24, generator=g)
    gc, a = torch.randn(6, 40, generator=g), 0.02 * torch.randn(300, 40, generator=g)
    args = [x.to(DEV) for x in (h, w, gc, a)] + [None]
    t, k, p = _per_row_options(300)
    for randomness in (dict(seed=5), dict(seed=torch.tensor(5, device=DEV)), dict(seed=torch.arange(6, device=DEV))):
        kw = dict(lam=1.0, temperature=t, top_k=k, top_p=p, **randomness)
        assert torch.equal(rectified_decode_head(*args, impl=impl, **kw), rectified_decode_head_reference(*args, **kw))


# ------------------------------------------------------------------------------------------ validation


BAD = [
    ("seed", dict(seed=1.5), "seed"),
    ("seed", dict(seed=True), "seed"),
    ("seed", dict(seed=2**63), "seed"),
    ("seed", dict(seed=torch.ones(3, 1, dtype=torch.int64)), "shape"),
    ("seed", dict(seed=torch.tensor(3.0)), "integer"),
    ("seed", dict(seed=torch.tensor([1.0, 2.0, 3.0])), "integer"),
    ("seed", dict(seed=torch.tensor([1, 2])), "shape"),
    ("seed", dict(seed=3, generator=torch.Generator()), "generator"),
    ("temperature", dict(temperature=torch.tensor([1.0, -1.0, 0.5])), "0 \\(greedy\\) or finite values"),
    ("temperature", dict(temperature=torch.tensor([1.0, float("nan"), 0.5])), "finite"),
    ("temperature", dict(temperature=torch.tensor([1, 1, 1])), "floating"),
    ("temperature", dict(temperature=torch.ones(3, 1)), "shape"),
    ("top_k", dict(top_k=torch.tensor([1, -2, 3])), ">= 0"),
    ("top_k", dict(top_k=torch.tensor([1.0, 2.0, 3.0])), "integer"),
    ("top_p", dict(top_p=torch.tensor([0.5, 1.5, 1.0])), r"\(0, 1\]"),
    ("top_p", dict(top_p=torch.tensor([0.5, 0.0, 1.0])), r"\(0, 1\]"),
    ("top_p", dict(top_p=torch.ones(4)), "shape"),
    ("top_p", dict(top_p=torch.ones(3, device="meta")), "tensor on cpu"),
    # Values the fp32 arithmetic cannot hold: rejected, never a 0/0 or an inf deep inside.
    ("temperature", dict(temperature=1e-44), ">= 1.175e-38"),  # rounds to 0 or a denormal in fp32
    ("temperature", dict(temperature=torch.tensor([1.0, 1e-50, 0.0], dtype=torch.float64)), ">= 1.175e-38"),
    ("temperature", dict(temperature=1e39), "float32"),
    ("temperature", dict(temperature=10**400), "finite"),
    ("lam", dict(lam=1e39), "float32"),
    ("lam", dict(lam=torch.tensor([1.0, 1e39, 0.0], dtype=torch.float64)), "float32"),
    ("top_p", dict(top_p=torch.tensor([0.5, 1e-50, 1.0], dtype=torch.float64)), r"\(0, 1\]"),
]


@pytest.mark.parametrize(("name", "kw", "match"), BAD, ids=[f"{n}-{i}" for i, (n, _, _) in enumerate(BAD)])
def test_bad_per_row_options_and_seeds_raise(name, kw, match):
    z, f = torch.randn(3, 10), torch.randn(3, 10)
    with pytest.raises(ValueError, match=name) as err:
        rectified_next_token(z, f, impl="torch", **{"temperature": 1.0, **kw})
    assert err.match(match)


def test_decode_head_rejects_caps_beyond_float32():
    h, w, gc, a = torch.randn(2, 8), torch.randn(30, 8), torch.randn(2, 4), torch.randn(30, 4)
    for cap, match in ((1e39, "float32"), (1e-44, ">= 1.175e-38")):
        with pytest.raises(ValueError, match="softcap") as err:
            rectified_decode_head(h, w, gc, a, None, softcap=cap, impl="torch")
        assert err.match(match)
