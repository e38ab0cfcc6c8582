"""rectified_next_token: greedy semantics, token-for-token agreement with the reference sampler, filters,
the sampled distribution (chi-square), the all-zero fallback and input validation."""

from __future__ import annotations

import importlib
import importlib.util

import pytest
import torch

from tcopilot.kernels.rectified_next_token import (
    rectified_next_token,
    rectified_next_token_reference,
    rectified_probs_reference,
)
from tcopilot.testing import chi2_critical, chi2_statistic


def _inputs(b: int, v: int, seed: int = 0, f_scale: float = 0.05):
    g = torch.Generator().manual_seed(seed)
    z = 2.0 * torch.randn(b, v, generator=g)
    # f of the size of the Pilot's probabilities: it reorders the top tokens and makes some p~ negative
    f = f_scale * torch.randn(b, v, generator=g)
    return z, f


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------------------- greedy


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("fusion", ["probs", "logits"])
def test_greedy_is_argmax_of_fused_scores(fusion, dtype):
    z, f = _inputs(33, 1000, seed=1, f_scale=0.2)
    z, f = z.to(dtype), f.to(dtype)
    for lam in (0.5, 3.0, torch.linspace(-1.0, 4.0, 33)):
        lam_col = lam[:, None] if isinstance(lam, torch.Tensor) else lam
        if fusion == "probs":
            fused = torch.softmax(z.float(), dim=-1) + lam_col * f.float()
        else:
            fused = z.float() + lam_col * f.float()
        want = fused.argmax(dim=-1)
        got = rectified_next_token(z, f, lam=lam, fusion=fusion)
        assert got.dtype == torch.int64 and got.shape == (33,)
        assert torch.equal(got, want)
        assert torch.equal(rectified_next_token_reference(z, f, lam=lam, fusion=fusion), want)
        probs = rectified_probs_reference(z, f, lam=lam, fusion=fusion)
        assert torch.equal(probs, torch.nn.functional.one_hot(want, 1000).float())


@pytest.mark.parametrize("fusion", ["probs", "logits"])
def test_lam_zero_greedy_is_pilot_argmax(fusion):
    z, f = _inputs(50, 257, seed=2, f_scale=10.0)
    assert torch.equal(rectified_next_token(z, f, lam=0.0, fusion=fusion), z.argmax(dim=-1))


@pytest.mark.parametrize("fusion", ["probs", "logits"])
def test_greedy_ties_go_to_lowest_id(fusion):
    z = torch.tensor([[0.0, 0.0, 0.0], [1.0, 3.0, 3.0]])
    f = torch.zeros_like(z)
    assert rectified_next_token(z, f, fusion=fusion).tolist() == [0, 1]


def test_per_row_lam_equals_scalar_lam_row_by_row():
    z, f = _inputs(6, 300, seed=3, f_scale=0.3)
    lam = torch.tensor([0.0, 0.5, 1.0, 2.0, -1.0, 8.0])
    for fusion in ("probs", "logits"):
        got = rectified_next_token(z, f, lam=lam, fusion=fusion)
        rows = [
            rectified_next_token(z[i : i + 1], f[i : i + 1], lam=float(lam[i]), fusion=fusion)
            for i in range(6)
        ]
        assert torch.equal(got, torch.cat(rows))


def test_greedy_draws_no_random_numbers():
    z, f = _inputs(4, 50)
    g = _gen(5)
    rectified_next_token(z, f, temperature=0.0, generator=g)
    assert torch.equal(torch.rand(3, generator=g), torch.rand(3, generator=_gen(5)))


# -------------------------------------------------------------------------------- sampling vs reference

SAMPLING = [
    # fusion, temperature, top_k, top_p, lam
    ("probs", 1.0, 0, 1.0, 1.0),
    ("probs", 0.7, 20, 1.0, 2.0),
    ("probs", 1.3, 0, 0.8, 1.0),
    ("probs", 0.5, 10, 0.5, "rows"),
    ("probs", 1e-3, 0, 1.0, 1.0),
    ("probs", 1.0, 1, 1.0, 1.0),
    ("probs", 1.0, 5000, 0.99, 1.0),
    ("logits", 1.0, 0, 1.0, 1.0),
    ("logits", 0.8, 7, 1.0, 5.0),
    ("logits", 1.5, 0, 0.3, "rows"),
    ("logits", 1.0, 50, 0.9, -2.0),
]


def _lam(spec, b):
    return torch.linspace(-2.0, 6.0, b) if spec == "rows" else spec


@pytest.mark.parametrize("config", SAMPLING, ids=lambda c: "-".join(map(str, c)))
def test_sampling_matches_reference_token_for_token(config):
    fusion, temperature, top_k, top_p, lam = config
    b, v = 257, 300
    z, f = _inputs(b, v, seed=4, f_scale=0.05)
    kw = dict(lam=_lam(lam, b), fusion=fusion, temperature=temperature, top_k=top_k, top_p=top_p)
    g_torch, g_ref = _gen(11), _gen(11)
    got = rectified_next_token(z, f, generator=g_torch, impl="torch", **kw)
    want = rectified_next_token_reference(z, f, generator=g_ref, **kw)
    assert torch.equal(got, want)
    # both consumed the generator identically, so a decode loop stays in lockstep
    assert torch.equal(torch.rand(2, generator=g_torch), torch.rand(2, generator=g_ref))
    probs = rectified_probs_reference(z, f, **kw)
    assert (probs.gather(1, got[:, None]) > 0).all()


def test_sampling_is_deterministic_given_generator():
    z, f = _inputs(64, 100)
    kw = dict(temperature=1.0, top_p=0.9)
    a = rectified_next_token(z, f, generator=_gen(1), **kw)
    assert torch.equal(a, rectified_next_token(z, f, generator=_gen(1), **kw))
    assert not torch.equal(a, rectified_next_token(z, f, generator=_gen(2), **kw))


# ------------------------------------------------------------------------------------------- filters


def _fused_weights(z, f, lam, fusion):
    """Scores whose order is the order of the final probabilities (temperature is monotone)."""
    return torch.softmax(z, -1) + lam * f if fusion == "probs" else z + lam * f


@pytest.mark.parametrize("fusion", ["probs", "logits"])
@pytest.mark.parametrize("top_k, top_p", [(5, 1.0), (0, 0.6), (8, 0.7)])
def test_filters_never_emit_excluded_tokens(fusion, top_k, top_p):
    n, v = 4000, 40
    z, f = _inputs(3, v, seed=6, f_scale=0.02)
    kw = dict(lam=1.5, fusion=fusion, temperature=1.2, top_k=top_k, top_p=top_p)
    probs = rectified_probs_reference(z, f, **kw)
    weights = _fused_weights(z, f, 1.5, fusion)
    for row in range(3):
        kept = probs[row] > 0
        # check the reference's kept set against the definitions, independently of its code
        if top_k:
            assert kept.sum() <= top_k
            assert kept.all() or weights[row][kept].min() > weights[row][~kept].max()
        if top_p < 1:
            full = rectified_probs_reference(z[row : row + 1], f[row : row + 1], **{**kw, "top_p": 1.0})[0]
            mass = full[kept].sum().item()
            assert mass >= top_p - 1e-6
            assert mass - full[kept].min().item() < top_p
        tokens = rectified_next_token(
            z[row].repeat(n, 1), f[row].repeat(n, 1), generator=_gen(row), impl="torch", **kw
        )
        assert kept[tokens].all(), f"row {row}: emitted tokens {sorted(set(tokens[~kept[tokens]].tolist()))}"
        assert kept.sum() == 1 or len(set(tokens.tolist())) > 1


def test_logits_fusion_never_emits_banned_tokens():
    z, f = _inputs(2000, 30, seed=7)
    z[:, ::3] = float("-inf")
    tokens = rectified_next_token(z, f, fusion="logits", temperature=1.0, generator=_gen(0))
    assert (tokens % 3 != 0).all()


def test_zero_uniform_draw_is_harmless(monkeypatch):
    # torch.rand may return exactly 0; the draw is clamped so that a kept token still wins the race
    z, f = _inputs(8, 64, seed=8)
    monkeypatch.setattr(torch, "rand", lambda *a, **kw: torch.zeros(*a[0]))
    tokens = rectified_next_token(z, f, temperature=1.0, top_k=1, generator=_gen(0))
    assert torch.equal(tokens, rectified_next_token(z, f))


# ------------------------------------------------------------------------------------- distribution


DISTRIBUTIONS = [
    ("probs", 0.8, 8, 0.95, 1.0),
    ("probs", 1.5, 0, 1.0, 3.0),
    ("logits", 1.3, 0, 1.0, 2.0),
    ("logits", 0.6, 6, 0.9, 1.0),
]


@pytest.mark.parametrize("config", DISTRIBUTIONS, ids=lambda c: "-".join(map(str, c)))
def test_sampled_distribution_matches_reference(config):
    fusion, temperature, top_k, top_p, lam = config
    n, v = 20000, 12
    g = torch.Generator().manual_seed(21)
    z = torch.randn(1, v, generator=g)  # a flat-ish row: every kept token gets >= 50 expected draws
    f = 0.1 * torch.randn(1, v, generator=g)
    kw = dict(lam=lam, fusion=fusion, temperature=temperature, top_k=top_k, top_p=top_p)
    probs = rectified_probs_reference(z, f, **kw)[0]
    tokens = rectified_next_token(z.repeat(n, 1), f.repeat(n, 1), generator=_gen(123), impl="torch", **kw)
    stat, df = chi2_statistic(tokens, probs)
    critical = chi2_critical(df, 1e-6)
    assert stat < critical, f"chi-square {stat:.1f} >= {critical:.1f} (df={df})"
    # the test has power: the same draws are far from the distribution without temperature
    untempered = rectified_probs_reference(z, f, **{**kw, "temperature": 1.0 if temperature != 1.0 else 2.0})[
        0
    ]
    if (untempered > 0).equal(probs > 0):
        assert chi2_statistic(tokens, untempered)[0] > critical


# ------------------------------------------------------------------------------------------- fallback


@pytest.mark.parametrize("top_k, top_p", [(0, 1.0), (3, 1.0), (0, 0.5)])
def test_rows_with_nothing_left_after_clamp_fall_back_to_pilot_argmax(top_k, top_p):
    b, v = 64, 50
    z, f = _inputs(b, v, seed=9)
    dead = torch.arange(b) % 3 == 0
    f[dead] = -1.0  # p~ = p^ - 1 < 0 everywhere: nothing survives the clamp
    kw = dict(lam=1.0, temperature=0.9, top_k=top_k, top_p=top_p)
    probs = rectified_probs_reference(z, f, **kw)
    assert torch.isfinite(probs).all()
    assert torch.equal(probs[dead], torch.nn.functional.one_hot(z[dead].argmax(-1), v).float())
    for seed in range(5):
        tokens = rectified_next_token(z, f, generator=_gen(seed), **kw)
        assert torch.equal(tokens[dead], z[dead].argmax(-1))
        assert torch.equal(tokens, rectified_next_token_reference(z, f, generator=_gen(seed), **kw))
    # greedy needs no fallback: argmax of the unclamped p~ = p^ - 1 is the Pilot's argmax too
    assert torch.equal(rectified_next_token(z, f)[dead], z[dead].argmax(-1))


# ------------------------------------------------------------------------------------------ validation


def test_impl_triton_never_falls_back(monkeypatch):
    if importlib.util.find_spec("triton") is not None:
        # Import (decorate) the kernels under the interpreter first: one first imported without it would stay
        # compiled for a GPU for every later test of the session (a run of this file alone, say).
        importlib.import_module("tcopilot.kernels.rectified_next_token.triton_impl")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    z, f = _inputs(2, 10)
    kernel = importlib.util.find_spec("tcopilot.kernels.rectified_next_token.triton_impl")
    expected = NotImplementedError if kernel is None else (NotImplementedError, ValueError)
    with pytest.raises(expected):
        rectified_next_token(z, f, impl="triton")


def _bad():
    z, f = _inputs(3, 10)
    return (
        {
            "lam_nan": ("lam", dict(lam=float("nan"))),
            "lam_inf": ("lam", dict(lam=float("inf"))),
            "lam_tensor_nan": ("lam", dict(lam=torch.tensor([1.0, float("nan"), 0.0]))),
            "lam_tensor_shape": ("lam", dict(lam=torch.ones(2))),
            "lam_tensor_int": ("lam", dict(lam=torch.ones(3, dtype=torch.int64))),
            "lam_str": ("lam", dict(lam="1")),
            "top_p_zero": ("top_p", dict(top_p=0)),
            "top_p_above_one": ("top_p", dict(top_p=1.5)),
            "top_p_negative": ("top_p", dict(top_p=-0.1)),
            "top_p_nan": ("top_p", dict(top_p=float("nan"))),
            "temperature_negative": ("temperature", dict(temperature=-0.1)),
            "temperature_inf": ("temperature", dict(temperature=float("inf"))),
            "top_k_negative": ("top_k", dict(top_k=-1)),
            "top_k_float": ("top_k", dict(top_k=2.0)),
            "fusion": ("fusion", dict(fusion="prob")),
            "impl": ("impl", dict(impl="gpu")),
            "generator_type": ("generator", dict(generator=0)),
            "shape_mismatch": ("copilot_out", dict(copilot_out=f[:, :-1])),
            "batch_mismatch": ("copilot_out", dict(copilot_out=f[:2])),
            "copilot_int": ("copilot_out", dict(copilot_out=f.long())),
            "copilot_device": ("copilot_out", dict(copilot_out=f.to("meta"))),
            "pilot_rank": ("pilot_logits", dict(pilot_logits=z[0], copilot_out=f[0])),
            "pilot_int": ("pilot_logits", dict(pilot_logits=z.long())),
            "empty_batch": ("pilot_logits", dict(pilot_logits=z[:0], copilot_out=f[:0])),
            "empty_vocab": ("pilot_logits", dict(pilot_logits=z[:, :0], copilot_out=f[:, :0])),
        },
        z,
        f,
    )


BAD, _Z, _F = _bad()


@pytest.mark.parametrize("name", list(BAD))
def test_rectified_next_token_rejects_bad_input(name):
    arg, change = BAD[name]
    kwargs = {"pilot_logits": _Z, "copilot_out": _F, **change}
    with pytest.raises(ValueError, match=rf"^{arg}\b"):
        rectified_next_token(kwargs.pop("pilot_logits"), kwargs.pop("copilot_out"), **kwargs)
