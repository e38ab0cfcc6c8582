"""End to end: one training step and one decode step of a Pilot with and without a Copilot.

GPU: a Llama-3.2-1B-shaped Pilot (random weights, bf16: hidden 2048, 16 layers, 32 query / 8 kv heads,
intermediate 8192, V=128256, tied embeddings) with Copilots of 2, 4 and 16 layers of the same width
(``Copilot.from_pilot``; the 16-layer one is the paper's "1B Pilot + 1B Copilot"). CPU: a tiny Llama
(hidden 64, 2 layers, V=2000) with Copilots of 2 and 4 layers, finishing in seconds.

Ways (``provider`` in the results):

* ``naive``: the Copilot method in plain PyTorch as a reader of the paper writes it: the Pilot's logits
  ``[B, L, V]``, ``F.cross_entropy``, the error vectors ``onehot(y) - softmax(z)`` ``[B, L, V]``, the
  Copilot's input ``error_in(errors)`` and output ``f = error_out(g)`` ``[B, L, V]``, and the Copilot's
  attention as ``F.scaled_dot_product_attention`` with K/V repeated to all heads and a boolean mask built
  from the positions. The Pilot alone: Hugging Face's own loss (``model(input_ids, labels=...)``).
  Decode: ``error_in(f_prev)`` and ``f`` over the vocabulary, ``argmax(softmax(z) + lam * f)``.
* ``torch``: ``TransformerCopilot(impl="torch")``, the Copilot's attention with ``impl="torch"``; decode as
  ``tcopilot.generate`` does one step (fed-back input through the c x c matrix, ``rectified_next_token``).
* ``triton``: the same with ``impl="auto"`` (our Triton kernels on CUDA wherever one exists; the ops that
  have none yet run their PyTorch path: ``extra_info["triton_ops"]`` lists which ran Triton).
* ``copilot_alone`` (decode only): the same Copilot run as a plain decoder, without the Pilot: one new position
  from a fixed input embedding and two fixed log entries (no fed-back product, no Pilot hooks), its caches,
  ``error_out`` and an argmax over V. Issue 5's coupling target compares the pair's decode step with the
  Pilot alone + this: ``report.py`` shows ``triton / (Pilot alone + copilot_alone)`` (target at most 1.05).

The Copilot-0 rows are the Pilot alone; ``report.py`` gives each way's overhead over them. A training step
is forward + backward (no optimiser step); a decode step adds one token to a prefilled cache (restored
before every round, untimed). The flop model of :func:`flop_model` gives the model-flop utilisation.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from dataclasses import dataclass
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from benchutil import (
    DEVICE,
    ON_GPU,
    OneSlot,
    assert_close,
    case,
    dtype_name,
    free_memory,
    release,
    run_bench,
    set_group,
    triton_status,
)

import tcopilot.copilot
from tcopilot import Copilot, TransformerCopilot, rectified_next_token
from tcopilot.pilot import pilot_states, positions_from_mask, run_base, shift_labels

IGNORE = -100
LAM = 1.0


@dataclass(frozen=True)
class Cfg:
    name: str
    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    inter: int
    batch: int  # training step: batch x seq tokens
    seq: int
    dec_batch: int  # decode step: dec_batch rows against a prefilled cache of dec_ctx tokens
    dec_ctx: int
    dtype: torch.dtype

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


CPU_CFG = Cfg("tiny-llama", 2000, 64, 2, 4, 2, 128, 2, 64, 2, 32, torch.float32)
GPU_CFG = Cfg("llama-3.2-1b-shape", 128256, 2048, 16, 32, 8, 8192, 2, 2048, 8, 1024, torch.bfloat16)
# by "on GPU": the CPU run stays short; on a GPU the 16-layer Copilot (the paper's 1B Pilot with a 1B Copilot)
# comes right after the Pilot alone, so that a time-limited run (gpu_check.sh) cuts the small ones first
COPILOT_LAYERS = {False: [0, 2, 4], True: [0, 16, 2, 4]}
WAYS = ["naive", "torch", "triton", "copilot_alone"]
IMPL = {"torch": "torch", "triton": "auto", "copilot_alone": "auto"}


def _cases():
    out = []
    for gpu, cfg in ((False, CPU_CFG), (True, GPU_CFG)):
        for n in COPILOT_LAYERS[gpu]:  # outer: one Copilot in memory at a time
            for step in ("train", "decode"):
                for way in WAYS:
                    if step == "decode" and n == 0 and way != "naive":
                        continue  # the Pilot's decode step is the same in every way
                    if way == "copilot_alone" and (step != "decode" or n == 0):
                        continue
                    cid = f"{cfg.name}-copilot{n}-{step}-{way}"
                    out.append(case((cfg, n, step, way), id=cid, gpu=gpu))
    return out


# ----------------------------------------------------------------------------------------------- models


def build_pilot(cfg: Cfg):
    from transformers import LlamaConfig, LlamaForCausalLM

    hf = LlamaConfig(
        vocab_size=cfg.vocab, hidden_size=cfg.hidden, intermediate_size=cfg.inter,
        num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads, num_key_value_heads=cfg.kv_heads,
        max_position_embeddings=max(cfg.seq, cfg.dec_ctx) + 8, tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    with torch.device(DEVICE):
        model = LlamaForCausalLM(hf)
    return model.to(cfg.dtype)


def build_copilot(cfg: Cfg, pilot, layers: int) -> Copilot:
    torch.manual_seed(layers)
    with torch.device(DEVICE):
        cop = Copilot.from_pilot(pilot, num_hidden_layers=layers)
    cop = cop.to(cfg.dtype)
    with torch.no_grad():  # a zero head (the default init) would make the check below trivial
        cop.error_out.weight.normal_(0, 0.02)
        cop.error_out.bias.normal_(0, 0.02)
    return cop


def set_attention_impl(cop: Copilot, impl: str) -> None:
    for layer in cop.layers:
        layer.self_attn.impl = impl


PILOT = OneSlot()
COPILOT = OneSlot()


def models(cfg: Cfg, layers: int):
    pilot = PILOT.get(cfg, lambda: build_pilot(cfg))
    cop = COPILOT.get((cfg, layers), lambda: build_copilot(cfg, pilot, layers) if layers else None)
    return pilot, cop


# ------------------------------------------------------------------------------------ the naive method


def sdpa_log_attention(q, k, v, *, q_pos, k_pos, scale=None, impl="auto"):
    """The Copilot's attention as a user writes it: K/V repeated to every head, a boolean mask, SDPA."""
    group = q.shape[1] // k.shape[1]
    if group > 1:
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    mask = (k_pos[:, None, :] >= 0) & (k_pos[:, None, :] <= q_pos[:, :, None])
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None], scale=scale)


@contextmanager
def plain_attention():
    # The Copilot's layers call tcopilot.copilot.log_attention; swap in the SDPA version for the naive way.
    with mock.patch.object(tcopilot.copilot, "log_attention", sdpa_log_attention):
        yield


def naive_joint_losses(pilot, cop: Copilot, input_ids: torch.Tensor):
    """Pilot loss and Copilot loss with every vocabulary-sized tensor materialised."""
    mask = torch.ones_like(input_ids)
    pos = positions_from_mask(mask)
    with pilot_states(pilot) as st:
        hidden, _ = run_base(pilot.base_model, input_ids, mask, pos)
    logits = pilot.get_output_embeddings()(hidden).float()  # [B, L, V]
    vocab = logits.shape[-1]
    target = shift_labels(input_ids, IGNORE)
    counted = target != IGNORE
    pilot_loss = F.cross_entropy(logits.reshape(-1, vocab), target.reshape(-1), ignore_index=IGNORE)
    p = logits.detach().softmax(-1)
    ell = (F.one_hot(target.clamp(min=0), vocab).float() - p) * counted[..., None]  # errors [B, L, V]
    stream_err = torch.cat([torch.zeros_like(ell[:, :1]), ell[:, :-1]], dim=1)  # position t reads t-1
    stream = cop.error_in(stream_err.to(cop.error_in.weight.dtype))
    log = torch.cat([st.x_tilde, st.pooled.to(st.x_tilde.dtype)], dim=1)
    with plain_attention():
        g = cop(stream, log, pos, torch.cat([pos, pos], dim=1))
    f = cop.error_out(g).float()  # the Copilot's logits [B, L, V]
    copilot_loss = ((f - ell) ** 2).sum(-1)[counted].mean().sqrt()
    return pilot_loss, copilot_loss


# ------------------------------------------------------------------------------------------- the steps


def train_inputs(cfg: Cfg) -> torch.Tensor:
    g = torch.Generator(device=DEVICE).manual_seed(0)
    return torch.randint(0, cfg.vocab, (cfg.batch, cfg.seq), device=DEVICE, generator=g)


def train_step(way: str, pilot, cop, ids):
    """A function computing ``(pilot_loss, copilot_loss or None)`` for ``way``; the step calls backward."""
    if way == "naive":
        if cop is None:
            return lambda: (pilot(input_ids=ids, labels=ids).loss, None)
        return lambda: naive_joint_losses(pilot, cop, ids)
    if cop is not None:
        set_attention_impl(cop, IMPL[way])
    model = TransformerCopilot(pilot, cop, impl=IMPL[way])

    def run():
        out = model(ids)
        return out.pilot_loss, out.copilot_loss

    return run


@dataclass
class DecodeState:
    mask: torch.Tensor  # [B, ctx + 1]
    new_pos: torch.Tensor  # [B, 1]
    token: torch.Tensor  # [B] the token being fed
    cache: object  # the Pilot's cache after the prefill (restored by copy before every round)
    ccache: object | None
    g_prev: torch.Tensor | None  # Copilot's last hidden state [B, c]
    f_prev: torch.Tensor | None  # its output over the vocabulary [B, V] (the naive way feeds this back)
    m_mat: torch.Tensor | None = None
    m_vec: torch.Tensor | None = None
    live_cache: object = None
    live_ccache: object = None

    def restore(self):
        self.live_cache = copy.deepcopy(self.cache)
        self.live_ccache = copy.deepcopy(self.ccache)


@torch.no_grad()
def prefill(cfg: Cfg, pilot, cop, way: str) -> DecodeState:
    g = torch.Generator(device=DEVICE).manual_seed(1)
    ids = torch.randint(0, cfg.vocab, (cfg.dec_batch, cfg.dec_ctx), device=DEVICE, generator=g)
    mask = torch.ones_like(ids)
    pos = positions_from_mask(mask)
    with pilot_states(pilot) as st:
        hidden, cache = run_base(pilot.base_model, ids, mask, pos, use_cache=True)
    token = pilot.get_output_embeddings()(hidden[:, -1]).float().argmax(-1)
    state = DecodeState(torch.ones(cfg.dec_batch, cfg.dec_ctx + 1, dtype=mask.dtype, device=DEVICE),
                        pos[:, -1:] + 1, token, cache, None, None, None)
    if cop is not None:
        if way != "naive":
            set_attention_impl(cop, IMPL[way])
        # As generate does: caches sized for the step up front, int32 positions for the Copilot.
        state.ccache = cop.new_cache(max_positions=cfg.dec_ctx + 1)
        stream = cop.error_in.bias.expand(cfg.dec_batch, cfg.dec_ctx, -1)  # prompt: "no error"
        log = torch.cat([st.x_tilde, st.pooled.to(st.x_tilde.dtype)], dim=1)
        cpos = pos.to(torch.int32)
        with plain_attention() if way == "naive" else torch.no_grad():
            state.g_prev = cop(stream, log, cpos, torch.cat([cpos, cpos], 1), cache=state.ccache)[:, -1]
        state.f_prev = cop.error_out(state.g_prev).float()
        state.m_mat, state.m_vec = cop.feedback_matrices()
    return state


def decode_step(way: str, pilot, cop, s: DecodeState):
    """A function doing one decode step; returns ``(tokens, g)`` (``g`` None without a Copilot)."""
    base, head = pilot.base_model, pilot.get_output_embeddings()

    def pilot_step():
        return run_base(base, s.token[:, None], s.mask, s.new_pos, cache=s.live_cache, use_cache=True)

    if way == "copilot_alone":
        return copilot_alone_step(pilot, cop, s)

    @torch.no_grad()
    def run():
        if cop is None:
            hidden, _ = pilot_step()
            return head(hidden[:, -1]).float().argmax(-1), None
        with pilot_states(pilot) as st:
            hidden, _ = pilot_step()
        z = head(hidden[:, -1]).float()
        log = torch.cat([st.x_tilde, st.pooled.to(st.x_tilde.dtype)], dim=1)
        cpos = s.new_pos.to(torch.int32)
        log_pos = torch.cat([cpos, cpos], 1)
        wdtype = cop.error_in.weight.dtype
        if way == "naive":
            fed = cop.error_in(s.f_prev.to(wdtype))[:, None]  # [B, V] @ [V, c]
            with plain_attention():
                g = cop(fed, log, cpos, log_pos, cache=s.live_ccache)[:, -1]
            f = cop.error_out(g).float()  # [B, V]
            return (torch.softmax(z, dim=-1) + LAM * f).argmax(-1), g
        fed = (s.g_prev.float() @ s.m_mat + s.m_vec).to(wdtype)[:, None]  # error_in(f_prev), no V product
        g = cop(fed, log, cpos, log_pos, cache=s.live_ccache)[:, -1]
        f = cop.error_out(g).float()
        return rectified_next_token(z, f, lam=LAM, impl=IMPL[way]), g

    return run


def copilot_alone_step(pilot, cop, s: DecodeState, attention=None):
    """The Copilot as a plain decoder: one position from fixed inputs against its caches, ``error_out``, argmax.

    The input embedding and the two log entries are fixed tensors of the right shapes (what a token embedding
    and the Pilot's states would give), so nothing here depends on the Pilot's step. ``attention``: a context
    manager to run the layers in (the naive SDPA one for the reference)."""
    g = torch.Generator(device=DEVICE).manual_seed(3)
    b, c, d = s.token.shape[0], cop.config.hidden_size, cop.config.pilot_hidden_size
    dtype = cop.error_in.weight.dtype
    x = torch.randn(b, 1, c, device=DEVICE, generator=g).to(dtype)
    log = torch.randn(b, 2, d, device=DEVICE, generator=g).to(dtype)
    cpos = s.new_pos.to(torch.int32)
    log_pos = torch.cat([cpos, cpos], 1)

    @torch.no_grad()
    def run():
        with attention() if attention is not None else torch.no_grad():
            out = cop(x, log, cpos, log_pos, cache=s.live_ccache)[:, -1]
        return cop.error_out(out).float().argmax(-1), out

    return run


# ------------------------------------------------------------------------------------------ flop model


def flop_model(cfg: Cfg, cop_cfg, step: str) -> dict:
    """Model flops of one step, by term (multiply-adds count 2).

    Forward: linear layers ``2 * tokens * params``; causal attention ``4 * Hq * Dh * pairs`` per layer with
    ``pairs = L (L + 1) / 2`` per sequence (the Copilot's log layers see both log segments: twice that);
    the Pilot's LM head ``2 * tokens * d * V``; the Copilot's vocabulary products as the method defines
    them, ``error_in`` on the V-dimensional error and ``error_out`` to V outputs: ``2 * tokens * V * c``
    each. Training = forward + backward: 3x the forward for linear layers and the heads (2x for
    ``error_in``, whose input, the detached error, needs no gradient), 3.5x for attention (backward 2.5x,
    the FlashAttention convention). Decode: one new token per row against ``T`` cached positions
    (``pairs = T + 1``), forward only; the Copilot's fed-back input ``error_in(f_prev)`` is
    ``g_prev @ M + m`` with the c x c matrix ``M = error_out.weight^T error_in.weight^T`` formed once per
    generate call (Algorithm 2 as :func:`tcopilot.generate` runs it), so a decode step pays ``2 * c * c``
    per row for it instead of ``2 * V * c``; only ``error_out`` touches the vocabulary.
    """
    d, v = cfg.hidden, cfg.vocab
    kvd = cfg.kv_heads * cfg.head_dim
    pilot_layer = 2 * d * d + 2 * d * kvd + 3 * d * cfg.inter
    if step == "train":
        rows, seqs, length = cfg.batch * cfg.seq, cfg.batch, cfg.seq
        pairs = seqs * length * (length + 1) / 2
        lin, att, err_in = 3, 3.5, 2
    else:
        rows, seqs, length = cfg.dec_batch, cfg.dec_batch, cfg.dec_ctx
        pairs = seqs * (length + 1)
        lin, att, err_in = 1, 1, 1
    terms = {
        "pilot_linear": lin * 2 * rows * cfg.layers * pilot_layer,
        "pilot_attention": att * 4 * cfg.heads * cfg.head_dim * pairs * cfg.layers,
        "pilot_lm_head": lin * 2 * rows * d * v,
    }
    if cop_cfg is not None:
        c, hq = cop_cfg.hidden_size, cop_cfg.num_attention_heads
        hd = c // hq
        ckvd = cop_cfg.num_key_value_heads * hd
        n_log = cop_cfg.num_hidden_layers // 2  # 1-indexed even layers attend over the log
        n_self = cop_cfg.num_hidden_layers - n_log
        per_layer = 2 * c * c + 3 * c * cop_cfg.intermediate_size
        kv_self = 2 * c * ckvd  # k and v of the own stream, per token
        kv_log = 2 * 2 * c * ckvd  # k and v of two log entries per token
        proj = 2 * d * c if cop_cfg.pilot_hidden_size != c else 0
        lin_c = cop_cfg.num_hidden_layers * per_layer + n_self * kv_self + n_log * kv_log + proj
        terms["copilot_linear"] = lin * 2 * rows * lin_c
        terms["copilot_attention"] = att * 4 * hq * hd * pairs * (n_self + 2 * n_log)
        if step == "train":
            terms["copilot_vocab"] = (err_in + lin) * 2 * rows * v * c
        else:
            terms["copilot_vocab"] = 2 * rows * v * c  # error_out only
            terms["copilot_linear"] += 2 * rows * c * c  # the fed-back input through M
    terms["total"] = sum(terms.values())
    return terms


def decode_bytes(cfg: Cfg, pilot, cop) -> float:
    """Bytes one decode step reads at least: every weight it uses once (the tied embedding once) and the caches.

    The Copilot's ``error_in`` weight ([c, V]) is not read at decode: its fed-back input goes through the c x c
    matrix ``M`` (fp32, counted instead; see :func:`flop_model`)."""
    elt = torch.finfo(cfg.dtype).bits // 8
    params = sum(p.numel() for p in pilot.parameters())
    kv = cfg.layers * 2 * cfg.dec_batch * cfg.kv_heads * cfg.head_dim * cfg.dec_ctx
    extra = 0
    if cop is not None:
        cc = cop.config
        params += sum(p.numel() for n, p in cop.named_parameters() if not n.startswith("error_in."))
        extra = 4 * cc.hidden_size * (cc.hidden_size + 1)  # M and m in fp32
        hd = cc.hidden_size // cc.num_attention_heads
        n_log = cc.num_hidden_layers // 2
        per = 2 * cfg.dec_batch * cc.num_key_value_heads * hd * cfg.dec_ctx
        kv += (cc.num_hidden_layers - n_log) * per + n_log * 2 * per
    return float((params + kv) * elt + extra)


# ------------------------------------------------------------------------------------------ benchmark

REF_TRAIN = OneSlot()
REF_DECODE = OneSlot()


def _triton_ops() -> list[str]:
    ops = ("logit_capture", "log_attention", "rectified_next_token")
    return [op for op in ops if triton_status(op) is None]



@pytest.fixture(autouse=True, scope="module")
def _release_module_state():
    yield
    release(PILOT, COPILOT, REF_TRAIN, REF_DECODE)


@pytest.mark.parametrize(("cfg", "layers", "step", "way"), _cases())
def test_e2e(benchmark, cfg: Cfg, layers: int, step: str, way: str):
    extra = {}
    if way == "triton":
        ops = _triton_ops()
        if not ops:
            pytest.skip(triton_status("logit_capture"))
        extra["triton_ops"] = ",".join(ops)
    pilot, cop = models(cfg, layers)
    params = [p for m in (pilot, cop) if m is not None for p in m.parameters()]

    def clear():
        for p in params:
            p.grad = None

    if step == "train":
        ids = train_inputs(cfg)
        losses = train_step(way, pilot, cop, ids)

        def fn():
            pl, cl = losses()
            (pl if cl is None else pl + cl).backward()

        setup = clear
        # Correctness first, untimed: the losses of the naive way are the reference.
        with torch.no_grad():
            got = losses()
            ref = REF_TRAIN.get((cfg, layers), lambda: train_step("naive", pilot, cop, ids)())
            if way == "naive" and cop is not None and not ON_GPU:
                from tcopilot.testing import naive_joint_losses as package_naive

                set_attention_impl(cop, "torch")
                pl, cl, _, _ = package_naive(TransformerCopilot(pilot, cop, impl="torch"), ids,
                                             torch.ones_like(ids), ids)
                ref = (pl, cl)
        assert_close(f"{way} pilot loss", got[0], ref[0], cfg.dtype)
        if cop is not None:
            assert_close(f"{way} copilot loss", got[1], ref[1], cfg.dtype)
        del got
        flops = flop_model(cfg, cop.config if cop is not None else None, "train")
        nbytes = None
        shape = f"{cfg.name} B{cfg.batch}xL{cfg.seq} copilot={layers}L"
    else:
        state = prefill(cfg, pilot, cop, way)
        fn = decode_step(way, pilot, cop, state)
        setup = state.restore
        state.restore()
        tokens, g = fn()
        assert tokens.shape == (cfg.dec_batch,)
        if way == "copilot_alone":  # reference: the same step with the naive SDPA attention
            ref_state = prefill(cfg, pilot, cop, "naive")
            ref_state.restore()
            ref_g = copilot_alone_step(pilot, cop, ref_state, attention=plain_attention)()[1]
            set_attention_impl(cop, IMPL[way])
            assert_close(f"{way} Copilot decode state", g, ref_g, cfg.dtype,
                         tol=0.1 if cfg.dtype == torch.bfloat16 else None)  # fmt: skip
            del ref_state, ref_g
        elif cop is not None:
            ref_g = REF_DECODE.get((cfg, layers), lambda: _naive_decode_g(cfg, pilot, cop))
            # bf16: the ways feed the Copilot differently rounded inputs (error_in(f) over V against
            # g @ M + m in fp32) through every layer, hence the looser bound.
            tol = 0.1 if cfg.dtype == torch.bfloat16 else None
            assert_close(f"{way} Copilot decode state", g, ref_g, cfg.dtype, tol=tol)
        del tokens, g
        flops = flop_model(cfg, cop.config if cop is not None else None, "decode")
        nbytes = decode_bytes(cfg, pilot, cop)
        if way == "copilot_alone":  # the pair's terms less the Pilot's, less the fed-back product (M, m)
            c = cop.config.hidden_size
            alone = flop_model(cfg, None, "decode")
            flops = {k: v - alone.get(k, 0) for k, v in flops.items()}
            flops["copilot_linear"] -= 2 * cfg.dec_batch * c * c
            flops["total"] -= 2 * cfg.dec_batch * c * c
            nbytes -= decode_bytes(cfg, pilot, None) + 4 * c * (c + 1)
        shape = f"{cfg.name} B{cfg.dec_batch} ctx{cfg.dec_ctx} copilot={layers}L"

    clear()
    free_memory()
    set_group(benchmark, "e2e", shape, cfg.dtype, step, way, copilot_layers=layers, model=cfg.name,
              flop_terms={k: float(v) for k, v in flops.items()}, **extra)
    rounds, warmup = (5, 2) if ON_GPU else (None, None)
    run_bench(benchmark, fn, setup=setup, flops=flops["total"], nbytes=nbytes,
              bound="compute" if step == "train" else "memory", rounds=rounds, warmup=warmup)
    clear()


def _naive_decode_g(cfg: Cfg, pilot, cop):
    state = prefill(cfg, pilot, cop, "naive")
    state.restore()
    return decode_step("naive", pilot, cop, state)()[1]


def test_flop_model_pilot_matches_parameter_count():
    """The linear-layer term equals 2 flops per non-embedding parameter and token (sanity of the model)."""
    cfg = CPU_CFG
    pilot = build_pilot(cfg)
    body = sum(p.numel() for n, p in pilot.model.layers.named_parameters() if p.dim() == 2)
    terms = flop_model(cfg, None, "decode")
    assert terms["pilot_linear"] == 2 * cfg.dec_batch * body
    assert dtype_name(cfg.dtype) == "fp32"


def test_flop_and_byte_model_decode_copilot_terms():
    """At decode only ``error_out`` touches the vocabulary: the fed-back input goes through the c x c matrix."""
    cfg = CPU_CFG
    pilot = build_pilot(cfg)
    cop = build_copilot(cfg, pilot, 2)
    c = cop.config.hidden_size
    terms = flop_model(cfg, cop.config, "decode")
    assert terms["copilot_vocab"] == 2 * cfg.dec_batch * cfg.vocab * c
    train = flop_model(cfg, cop.config, "train")
    assert train["copilot_vocab"] == (2 + 3) * 2 * cfg.batch * cfg.seq * cfg.vocab * c
    elt = torch.finfo(cfg.dtype).bits // 8
    without = decode_bytes(cfg, pilot, None)
    used = sum(p.numel() for n, p in cop.named_parameters() if not n.startswith("error_in."))
    assert cop.error_in.weight.numel() == cfg.vocab * c  # the weight the decode step does not read
    hd = c // cop.config.num_attention_heads
    per_layer = 2 * cfg.dec_batch * cop.config.num_key_value_heads * hd * cfg.dec_ctx  # k and v of one stream
    caches = (1 + 2) * per_layer  # layer 1: own stream; layer 2: the log's two segments
    assert decode_bytes(cfg, pilot, cop) - without == (used + caches) * elt + 4 * c * (c + 1)
