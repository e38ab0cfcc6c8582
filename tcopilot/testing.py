"""Test helpers shipped with the package: tiny random Pilots of three families, a naive (materialising)
joint forward used as the oracle of ``TransformerCopilot``, and the chi-square check of a sampler."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from tcopilot import Copilot, TransformerCopilot
from tcopilot.pilot import pilot_logit_scale, pilot_states, positions_from_mask, run_base, shift_labels

VOCAB = 97


def left_padded_prompts(batch: int = 3, length: int = 6, vocab: int = VOCAB, seed: int = 0, low: int = 1):
    """``(input_ids, attention_mask)`` [batch, length] of random ids in ``[low, vocab)``, left-padded with id 0:
    row 1 has 2 pad positions and row 2 has 4 (so ``batch >= 3`` and ``length > 4``), row 0 none."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(low, vocab, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    for row, n_pad in ((1, 2), (2, 4)):
        mask[row, :n_pad] = 0
        ids[row, :n_pad] = 0
    return ids, mask


def tiny_pilot(family: str = "llama", vocab: int = VOCAB, seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    if family == "llama":
        cfg = LlamaConfig(
            vocab_size=vocab,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
            tie_word_embeddings=False,
        )
        return LlamaForCausalLM(cfg).float().eval()
    if family == "qwen2":
        cfg = Qwen2Config(
            vocab_size=vocab,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
        )
        return Qwen2ForCausalLM(cfg).float().eval()
    if family == "gpt2":
        cfg = GPT2Config(
            vocab_size=vocab,
            n_embd=32,
            n_layer=2,
            n_head=4,
            n_positions=128,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
        )
        return GPT2LMHeadModel(cfg).float().eval()
    raise ValueError(family)


def tiny_pair(
    family: str = "llama",
    copilot_hidden: int | None = None,
    layers: int = 2,
    seed: int = 0,
    randomize_head: bool = True,
):
    pilot = tiny_pilot(family, seed=seed)
    kw = {"num_hidden_layers": layers}
    if copilot_hidden:
        kw.update(hidden_size=copilot_hidden, num_attention_heads=2)
    torch.manual_seed(seed + 1)
    copilot = Copilot.from_pilot(pilot, **kw).float()
    if randomize_head:  # a zero head hides bugs in everything downstream of it
        with torch.no_grad():
            copilot.error_out.weight.normal_(0, 0.05)
            copilot.error_out.bias.normal_(0, 0.05)
    return TransformerCopilot(pilot, copilot, impl="torch")


def decoding_pair(family: str = "llama", attention_impl: str = "torch", layers: int = 3) -> TransformerCopilot:
    """:func:`tiny_pair` for decoding tests: a strong Copilot head (std 2.0: the Copilot changes tokens, so a broken
    feedback path shows) and the Copilot's attention on ``attention_impl``."""
    model = tiny_pair(family, layers=layers)
    with torch.no_grad():
        model.copilot.error_out.weight.normal_(0, 2.0)
    for layer in model.copilot.layers:
        layer.self_attn.impl = attention_impl
    return model


def assert_same_state(a, b, path: str = "state") -> None:
    """Equal nested state (dicts with the same keys, lists, tensors of the same dtype and values, plain values)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), path
    elif isinstance(a, dict):
        assert set(a) == set(b), path
        for k in a:
            assert_same_state(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_state(x, y, f"{path}[{i}]")
    else:
        assert a == b, path


def naive_joint_losses(model: TransformerCopilot, input_ids, attention_mask, labels, ignore_index=-100):
    """Materialise logits, the full-vocabulary errors and the Copilot's full-vocabulary output."""
    pilot, cop = model.pilot, model.copilot
    pos = positions_from_mask(attention_mask)
    with pilot_states(pilot) as st:
        hidden, _ = run_base(pilot.base_model, input_ids, attention_mask, pos.clamp(min=0))
    logits = pilot.get_output_embeddings()(hidden).float()  # the head as the model calls it: bias included
    scale = pilot_logit_scale(pilot.config)
    if scale is not None:
        logits = logits * scale
    if model.softcap:
        logits = model.softcap * torch.tanh(logits / model.softcap)
    target = shift_labels(labels, ignore_index)
    counted = target != ignore_index
    pilot_loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=ignore_index)
    p = logits.detach().softmax(-1)
    ell = F.one_hot(target.clamp(min=0), logits.shape[-1]).float() - p
    ell = ell * counted[..., None]
    stream_err = torch.cat([torch.zeros_like(ell[:, :1]), ell[:, :-1]], dim=1)
    stream = cop.error_in(stream_err)
    log = torch.cat([st.x_tilde, st.pooled], dim=1)
    g = cop(stream, log, pos, torch.cat([pos, pos], 1))
    f = cop.error_out(g)
    diff = ((f - ell) ** 2).sum(-1)[counted]
    copilot_loss = diff.mean().sqrt()
    return pilot_loss, copilot_loss, f, logits


def chi2_critical(df: int, alpha: float = 1e-6) -> float:
    """x with P(chi2_df >= x) <= alpha, from the Chernoff bound P(X >= x) <= (x/df)^(df/2) e^((df-x)/2).

    The bound holds for every x > df, so the value is conservative (larger than the exact quantile):
    with alpha = 1e-6 a correct sampler fails a test against it for fewer than one seed in a million.
    """

    def log_bound(x):
        return 0.5 * df * math.log(x / df) + 0.5 * (df - x)

    lo, hi = float(df), float(df) + 10.0
    while log_bound(hi) > math.log(alpha):
        hi *= 2
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if log_bound(mid) > math.log(alpha) else (lo, mid)
    return hi


def chi2_statistic(tokens: torch.Tensor, probs: torch.Tensor) -> tuple[float, int]:
    """Pearson's statistic of the sampled ``tokens`` [n] against the distribution ``probs`` [V], and its degrees
    of freedom. Fails if a token of probability 0 was drawn, or a cell expects fewer than 50 draws (the
    chi-square approximation needs well-filled cells)."""
    tokens, probs = tokens.cpu(), probs.double().cpu()
    observed = torch.bincount(tokens, minlength=probs.numel()).double()
    support = probs > 0
    assert observed[~support].sum() == 0, "sampled a token of probability 0"
    expected = tokens.numel() * probs[support]
    assert expected.min() >= 50, f"a cell expects {expected.min().item():.1f} < 50 draws: sample more"
    return ((observed[support] - expected) ** 2 / expected).sum().item(), int(support.sum()) - 1
