"""The split-row kernels of ``rectified_next_token`` (``triton_split.py``: rows without top-k / top-p, many programs
per row) against the one-program-per-row kernel, the PyTorch path and the oracle: greedy and sampled tokens, ties
across tiles, the fallbacks, per-row parameters, Philox seeds, and which kernel a call runs.

Without CUDA the kernels run under TRITON_INTERPRET=1 with 256-wide tiles: V = 600 gives three tiles per row, the
last one partial.
"""

from __future__ import annotations

import os

import torch

_HAS_CUDA = torch.cuda.is_available()
if not _HAS_CUDA:
    os.environ["TRITON_INTERPRET"] = "1"  # must precede the first import of triton / the kernels

import pytest  # noqa: E402

triton = pytest.importorskip("triton")

from tcopilot.kernels.rectified_next_token import (  # noqa: E402
    rectified_next_token,
    rectified_next_token_reference,
    rectified_probs_reference,
    triton_impl,  # noqa: E402
)
from tcopilot.kernels.rectified_next_token.triton_impl import rectified_next_token_triton  # noqa: E402
from tcopilot.kernels.rectified_next_token.triton_split import chunk_size  # noqa: E402

DEV = "cuda" if _HAS_CUDA else "cpu"


def _gen(seed: int) -> torch.Generator:
    return torch.Generator(device=DEV).manual_seed(seed)


def _hard_rows(b: int = 8, v: int = 600, seed: int = 0):
    """Random rows plus the awkward ones: a single finite logit in a late tile, a row that is -inf beyond its
    first tile, a row whose clamped p~ is all zero, a row of equal logits."""
    g = torch.Generator().manual_seed(seed)
    z = 2.0 * torch.randn(b, v, generator=g)
    f = 0.05 * torch.randn(b, v, generator=g)
    z[1] = float("-inf")
    z[1, v - 3] = 0.0
    z[2, 200:] = float("-inf")
    f[3] = -10.0
    z[4] = 1.0
    return z.to(DEV), f.to(DEV)


TEMPERATURES = [0.0, 0.5, 1.0, 1e-30, "rows"]


def _temperature(spec, b):
    # per-row temperatures, greedy rows (0) among them
    return torch.tensor([0.0, 0.3, 1.0, 2.0] * (b // 4), device=DEV) if spec == "rows" else spec


@pytest.mark.parametrize("fusion", ["probs", "logits"])
@pytest.mark.parametrize("temperature", TEMPERATURES, ids=str)
def test_split_equals_one_program_kernel(fusion, temperature):
    z, f = _hard_rows()
    kw = dict(fusion=fusion, temperature=_temperature(temperature, 8), lam=torch.linspace(-1.0, 3.0, 8, device=DEV))
    split = rectified_next_token_triton(z, f, generator=_gen(1), split=True, **kw)
    rowwise = rectified_next_token_triton(z, f, generator=_gen(1), split=False, **kw)
    assert torch.equal(split, rowwise), (split.tolist(), rowwise.tolist())
    assert split.min() >= 0 and split.max() < z.shape[1]
    for seed in (0, torch.tensor([5, 6, 7, 8, 9, 10, 11, 12], device=DEV)) if temperature != 0.0 else ():
        split = rectified_next_token_triton(z, f, seed=seed, split=True, **kw)
        assert torch.equal(split, rectified_next_token_triton(z, f, seed=seed, split=False, **kw))


@pytest.mark.parametrize("fusion", ["probs", "logits"])
@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_split_matches_torch_and_reference(fusion, temperature):
    z, f = _hard_rows(seed=1)
    z, f = z[[0, 3, 5, 6, 7]], f[[0, 3, 5, 6, 7]]  # finite rows (the torch path's -inf rows differ by design)
    kw = dict(lam=1.5, fusion=fusion, temperature=temperature)
    got = rectified_next_token_triton(z, f, generator=_gen(3), split=True, **kw)
    assert torch.equal(got, rectified_next_token(z, f, generator=_gen(3), impl="torch", **kw))
    assert torch.equal(got, rectified_next_token_reference(z, f, generator=_gen(3), **kw))
    assert (rectified_probs_reference(z, f, **kw).gather(1, got[:, None]) > 0).all()


@pytest.mark.parametrize("fusion", ["probs", "logits"])
def test_greedy_ties_across_tiles_go_to_lowest_id(fusion):
    c = chunk_size()
    v = 3 * c + 17
    z = torch.zeros(4, v, device=DEV)
    z[1, [c + 5, 2 * c + 1]] = 2.0  # tied in two tiles
    z[2, [3 * c + 3, 3 * c + 4]] = 1.0  # tied twice in the last, partial tile
    z[3, [c - 1, c]] = 1.0  # tied on both sides of a tile edge
    f = torch.zeros_like(z)
    got = rectified_next_token_triton(z, f, fusion=fusion, split=True)
    assert got.tolist() == [0, c + 5, 3 * c + 3, c - 1]


def test_tiny_temperature_samples_the_greedy_token():
    # the race of a tile that does not hold the row maximum is shifted by (m_t - M) / T = -inf: it cannot win
    z, f = _hard_rows(seed=2)
    rows = [0, 5, 6, 7]
    z, f = z[rows], f[rows]
    greedy = rectified_next_token_triton(z, f, split=True)
    for seed in range(3):
        assert torch.equal(rectified_next_token_triton(z, f, temperature=1e-30, seed=seed, split=True), greedy)


def test_fallbacks():
    z, f = _hard_rows(seed=3)
    f[1:3] = 0.0  # p~ = p^ in these rows
    probs = rectified_next_token_triton(z, f, temperature=1.0, seed=1, split=True)
    assert probs[1].item() == z.shape[1] - 3  # the only finite logit
    assert probs[2].item() < 200  # nothing beyond the first tile has probability
    assert probs[3].item() == z[3].argmax().item()  # clamped p~ all zero: argmax z
    dead = torch.full((2, 700), float("-inf"), device=DEV)
    for temperature in (0.0, 1.0):
        out = rectified_next_token_triton(dead, torch.zeros_like(dead), fusion="logits", temperature=temperature,
                                          seed=0, split=True)
        assert out.tolist() == [0, 0]  # no finite score anywhere: the first id, as the one-program kernel


@pytest.mark.parametrize("v", [1, 7, 256, 257])
def test_small_and_edge_vocabularies(v):
    z, f = _hard_rows(v=max(v, 8), seed=4)
    z, f = z[[0, 4], :v].contiguous(), f[[0, 4], :v].contiguous()
    for kw in (dict(), dict(temperature=0.9, seed=3), dict(fusion="logits", temperature=1.2, generator=_gen(2))):
        gen = kw.pop("generator", None)
        got = rectified_next_token_triton(z, f, split=True, generator=gen, **kw)
        gen = _gen(2) if gen is not None else None
        assert torch.equal(got, rectified_next_token_triton(z, f, split=False, generator=gen, **kw))


def test_per_row_seed_draw_does_not_depend_on_the_batch():
    z, f = _hard_rows(seed=5)
    seeds = torch.arange(100, 108, device=DEV)
    full = rectified_next_token_triton(z, f, temperature=1.0, seed=seeds, split=True)
    for i in (0, 5, 7):
        alone = rectified_next_token_triton(z[i : i + 1], f[i : i + 1], temperature=1.0, seed=seeds[i : i + 1],
                                            split=True)
        assert alone.item() == full[i].item()


def test_strided_and_half_precision_inputs():
    z, f = _hard_rows(seed=6)
    v = z.shape[1]
    wide_z = torch.zeros(8, v + 400, device=DEV)
    wide_z[:, :v] = z
    kw = dict(temperature=0.7, seed=2)
    assert torch.equal(rectified_next_token_triton(wide_z[:, :v], f, split=True, **kw),
                       rectified_next_token_triton(z, f, split=True, **kw))
    zh, fh = z.half(), f.half()
    assert torch.equal(rectified_next_token_triton(zh, fh, split=True, **kw),
                       rectified_next_token_triton(zh, fh, split=False, **kw))


def test_dispatch(monkeypatch):
    """Unfiltered calls take the split kernels, calls that need a threshold search the one-program kernel."""
    calls = []
    real = triton_impl.split_rows_next_token
    monkeypatch.setattr(triton_impl, "split_rows_next_token", lambda *a, **k: calls.append(1) or real(*a, **k))
    z, f = (t[:4] for t in _hard_rows(seed=7))

    def runs_split(**kw):
        calls.clear()
        rectified_next_token(z, f, impl="triton", **kw)
        return bool(calls)

    assert runs_split()
    assert runs_split(temperature=0.0, top_k=5, top_p=0.5)  # greedy: the filters do not apply
    assert runs_split(temperature=1.0, top_k=z.shape[1], generator=_gen(0))  # k >= V is off
    assert runs_split(temperature=1.0, top_k=0, top_p=1.0, generator=_gen(0))
    assert not runs_split(temperature=1.0, top_k=5, generator=_gen(0))
    assert not runs_split(temperature=1.0, top_p=0.9, generator=_gen(0))
    calls.clear()
    rectified_next_token_triton(z, f, temperature=1.0, top_k=torch.zeros(4, dtype=torch.int64, device=DEV), seed=1)
    assert not calls  # a top_k tensor may hold filters: no sync to find out
    with pytest.raises(ValueError, match="split"):
        rectified_next_token_triton(z, f, temperature=1.0, top_p=0.9, seed=1, split=True)
    out, passes = rectified_next_token_triton(z, f, temperature=1.0, seed=1, return_search_passes=True)
    assert passes.shape == (4, 3) and not passes.any()


@pytest.mark.gpu
@pytest.mark.skipif(not _HAS_CUDA, reason="needs CUDA (the interpreter takes minutes for these draws)")
def test_gpu_sampled_distribution_spans_tiles():
    """Over many draws the split path's tokens follow p~: the mass sits on tokens in different tiles, so the
    combine's shift between tiles is what decides most races."""
    c = chunk_size()
    v = 2 * c + 9
    hot = torch.tensor([3, c + 1, c + 2, 2 * c + 8])
    z = torch.full((1, v), -30.0)
    z[0, hot] = torch.tensor([0.0, 0.5, -0.7, 1.0])
    f = torch.zeros(1, v)
    f[0, hot[0]] = 0.1
    n = 20000
    kw = dict(lam=1.0, fusion="probs", temperature=1.3)
    probs = rectified_probs_reference(z, f, **kw)[0].double()
    z, f = z.to(DEV).expand(n, v), f.to(DEV).expand(n, v)
    tokens = rectified_next_token_triton(z, f, seed=torch.arange(n, device=DEV), split=True, **kw).cpu()
    counts = torch.bincount(tokens, minlength=v).double()
    assert counts.sum() == counts[hot].sum()  # the tail's probability is ~1e-13
    expected = n * probs[hot] / probs[hot].sum()
    stat = ((counts[hot] - expected) ** 2 / expected).sum().item()
    assert stat < 30.0, (counts[hot].tolist(), expected.tolist())  # chi-square, 3 dof: P(> 30) ~ 1e-6
    # the same draws as the one-program kernel, token for token
    assert torch.equal(tokens, rectified_next_token_triton(z, f, seed=torch.arange(n, device=DEV), split=False,
                                                           **kw).cpu())
