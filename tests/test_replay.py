"""log_mode="replay": the Copilot trained from the compressed Mistake Log; Trainer hooks; `tcopilot inspect`."""

from __future__ import annotations

import json
import types

import pytest
import torch

from tcopilot import MistakeLog, TransformerCopilot
from tcopilot.cli import main as cli_main
from tcopilot.data.tokenizer import WordTokenizer
from tcopilot.mistake_log import dense_errors, sparse_errors
from tcopilot.pilot import pilot_states, positions_from_mask, run_base
from tcopilot.replay import pilot_input_states, replay_copilot_loss, sparse_error_embedding, sparse_error_loss
from tcopilot.testing import VOCAB, tiny_pair
from tcopilot.train import TrainConfig, Trainer


def _batch(gen, b=3, length=11, padding="right"):
    ids = torch.randint(1, VOCAB, (b, length), generator=gen)
    mask = torch.ones_like(ids)
    if padding == "right":
        mask[1, 8:] = 0
        mask[2, 5:] = 0
    else:
        mask[1, :3] = 0
        mask[2, :6] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :2] = -100
    return ids, mask, labels


def _sparse_case(gen, n=9, c=6, vocab=40, k=5):
    y = torch.randint(0, vocab, (n,), generator=gen)
    ids = torch.stack([torch.randperm(vocab, generator=gen)[:k] for _ in range(n)])
    ids[::3, 1] = y[::3]  # the label among the kept ids in some rows
    p = torch.rand(n, k, generator=gen)
    p = p / p.sum(1, keepdim=True) * 0.9
    return y, ids, p.log()


def test_sparse_loss_and_embedding_equal_the_materialised_computation(gen):
    n, c, vocab = 9, 6, 40
    y, topk_ids, logp = _sparse_case(gen, n, c, vocab)
    ids, coef, ell_sq = sparse_errors(y, topk_ids, logp)
    dense = torch.zeros(n, vocab, dtype=torch.float64).scatter_add_(1, ids, coef.double())
    torch.testing.assert_close(ell_sq.double(), (dense**2).sum(1), rtol=1e-6, atol=1e-6)

    g = torch.randn(n, c, dtype=torch.float64, generator=gen, requires_grad=True)
    B = torch.randn(vocab, c, dtype=torch.float64, generator=gen, requires_grad=True)
    b = torch.randn(vocab, dtype=torch.float64, generator=gen, requires_grad=True)
    got = sparse_error_loss(g, B, b, ids, coef, (dense**2).sum(1))
    want = ((g @ B.T + b - dense) ** 2).sum(1).mean().sqrt()
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    grads_got = torch.autograd.grad(got, (g, B, b))
    grads_want = torch.autograd.grad(want, (g, B, b))
    for a, w in zip(grads_got, grads_want):
        torch.testing.assert_close(a, w, rtol=1e-10, atol=1e-12)

    lin = torch.nn.Linear(vocab, c).double()
    cop = types.SimpleNamespace(error_in=lin)
    counted = torch.zeros(n + 4, dtype=torch.bool)
    counted[torch.randperm(n + 4, generator=gen)[:n]] = True
    emb = sparse_error_embedding(cop, counted, ids, coef)
    full = torch.zeros(n + 4, vocab, dtype=torch.float64)
    full[counted] = dense
    want_emb = lin(full)
    torch.testing.assert_close(emb, want_emb, rtol=1e-12, atol=1e-12)
    up = torch.randn_like(emb)
    ga = torch.autograd.grad((emb * up).sum(), (lin.weight, lin.bias))
    gw = torch.autograd.grad((want_emb * up).sum(), (lin.weight, lin.bias))
    for a, w in zip(ga, gw):
        torch.testing.assert_close(a, w, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("family,padding", [("llama", "left"), ("gpt2", "left"), ("gpt2", "right")])
def test_recomputed_x_tilde_equals_the_hooked_one(gen, family, padding):
    # GPT-2 adds learned position embeddings before its first layer: they come from the stored mask.
    model = tiny_pair(family)
    ids, mask, _ = _batch(gen, padding=padding)
    pos = positions_from_mask(mask)
    with pilot_states(model.pilot) as st:
        run_base(model.pilot.base_model, ids, mask, pos.clamp(min=0))
    got = pilot_input_states(model.pilot, ids, mask)
    real = mask.bool()
    torch.testing.assert_close(got[real], st.x_tilde[real], rtol=0, atol=0)


def _copilot_grads(model):
    return {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p))
            for n, p in model.copilot.named_parameters()}


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_replay_with_all_ids_and_fp32_states_equals_online(gen, family):
    model = tiny_pair(family)
    model.mistake_log = MistakeLog(topk=VOCAB, pooled_dtype="float32")
    model.train()
    ids, mask, labels = _batch(gen)
    out = model(ids, attention_mask=mask, labels=labels)
    out.copilot_loss.backward()
    g_online = _copilot_grads(model)
    model.zero_grad(set_to_none=True)
    assert len(model.mistake_log) == 1
    replay = replay_copilot_loss(model, model.mistake_log[0])
    torch.testing.assert_close(replay, out.copilot_loss, rtol=1e-5, atol=1e-6)
    replay.backward()
    g_replay = _copilot_grads(model)
    for name in g_online:
        torch.testing.assert_close(g_replay[name], g_online[name], rtol=1e-4, atol=1e-6, msg=name)
    assert all(p.grad is None for p in model.pilot.parameters())


def test_replay_loss_equals_materialised_loss_on_rebuilt_sparse_errors(gen):
    model = tiny_pair("llama")
    model.mistake_log = MistakeLog(topk=5, pooled_dtype="bfloat16", topk_dtype="float16")
    model.train()
    ids, mask, labels = _batch(gen)
    model(ids, attention_mask=mask, labels=labels)
    entry = model.mistake_log[0]
    got = replay_copilot_loss(model, entry)
    g_got = torch.autograd.grad(got, list(model.copilot.parameters()), allow_unused=True)

    cop = model.copilot
    bsz, length = ids.shape
    counted = entry.counted()
    y = entry.targets.reshape(-1)[counted].long()
    ell = torch.zeros(bsz * length, VOCAB)
    ell[counted] = dense_errors(y, entry.topk_ids, entry.topk_logp, VOCAB)
    ell = ell.view(bsz, length, VOCAB)
    stream = cop.error_in(torch.cat([torch.zeros_like(ell[:, :1]), ell[:, :-1]], dim=1))
    pos = positions_from_mask(mask)
    x_tilde = pilot_input_states(model.pilot, ids, mask)
    log_states = torch.cat([x_tilde, entry.pooled_states()], dim=1)
    g = cop(stream, log_states, pos, torch.cat([pos, pos], 1))
    f = cop.error_out(g).reshape(bsz * length, VOCAB)[counted]
    want = ((f - ell.reshape(-1, VOCAB)[counted]) ** 2).sum(1).mean().sqrt()
    g_want = torch.autograd.grad(want, list(model.copilot.parameters()), allow_unused=True)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for (name, _), a, w in zip(model.copilot.named_parameters(), g_got, g_want):
        a = torch.zeros(()) if a is None else a
        w = torch.zeros(()) if w is None else w
        torch.testing.assert_close(a.expand_as(w) if a.dim() == 0 else a, w, rtol=1e-4, atol=1e-6, msg=name)
    # The approximation is visible: the stored top-5 leaves probability outside the kept ids.
    assert float(entry.residual_mass().mean()) > 0.5


def test_replay_mode_forward(gen):
    base = tiny_pair("llama")
    model = TransformerCopilot(base.pilot, base.copilot, impl="torch", log_mode="replay")
    assert isinstance(model.mistake_log, MistakeLog) and model.mistake_log.topk == 32
    model.train()
    ids, mask, labels = _batch(gen)
    out = model(ids, attention_mask=mask, labels=labels)
    assert len(model.mistake_log) == 1
    # One entry in the buffer: the draw is the entry just pushed.
    torch.testing.assert_close(out.copilot_loss, replay_copilot_loss(model, model.mistake_log[0]))
    out.copilot_loss.backward()
    assert all(p.grad is None for p in model.pilot.parameters())
    assert model.copilot.error_in.weight.grad is not None
    # Outside training nothing is pushed and the loss is the exact online one.
    model.eval()
    online = TransformerCopilot(base.pilot, base.copilot, impl="torch").eval()
    with torch.no_grad():
        a = model(ids, attention_mask=mask, labels=labels).copilot_loss
        b = online(ids, attention_mask=mask, labels=labels).copilot_loss
    assert len(model.mistake_log) == 1
    torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="log_mode"):
        TransformerCopilot(base.pilot, base.copilot, log_mode="offline")


def _examples(n=40, length=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        start = int(torch.randint(1, VOCAB, (1,), generator=g))
        stride = int(torch.randint(1, 4, (1,), generator=g))
        ln = int(torch.randint(length - 3, length + 1, (1,), generator=g))
        ids = [(start + stride * i) % (VOCAB - 1) + 1 for i in range(ln)]
        out.append({"input_ids": ids, "labels": [-100] * 2 + ids[2:]})
    return out


def _replay_model(seed=0):
    base = tiny_pair("llama", seed=seed)
    return TransformerCopilot(base.pilot, base.copilot, impl="torch", log_mode="replay",
                              mistake_log=MistakeLog(capacity=4, topk=8, seed=0))


def _cfg(**kw):
    base = dict(steps=10, batch_size=8, lr_pilot=3e-3, lr_copilot=3e-3, warmup_steps=2, log_every=1,
                ckpt_every=4, seed=0)
    base.update(kw)
    return TrainConfig(**base)


def test_trainer_killed_mid_training_resumes_with_the_same_buffer(tmp_path):
    ex = _examples()
    torch.manual_seed(0)
    ref = _replay_model()
    Trainer(ref, ex, _cfg(), str(tmp_path / "a"), progress=False).train()

    torch.manual_seed(0)
    m1 = _replay_model()
    Trainer(m1, ex, _cfg(), str(tmp_path / "b"), progress=False).train(stop_after=6)
    # Killed after step 6; the last checkpoint is step 4. A new process starts from other weights and an
    # empty log.
    torch.manual_seed(123)
    m2 = _replay_model(seed=5)
    tr = Trainer(m2, ex, _cfg(), str(tmp_path / "b"), progress=False)
    tr.train()
    assert tr.step == 10
    for (n, a), (_, b) in zip(ref.state_dict().items(), m2.state_dict().items()):
        assert torch.equal(a, b), n
    sa, sb = ref.mistake_log.state_dict(), m2.mistake_log.state_dict()
    assert [e["step"] for e in sa["entries"]] == [7, 8, 9, 10]
    assert [e["step"] for e in sb["entries"]] == [7, 8, 9, 10]
    for ea, eb in zip(sa["entries"], sb["entries"]):
        for k in ea["tensors"]:
            assert torch.equal(ea["tensors"][k], eb["tensors"][k]), k
    for k in sa["summary"]:
        assert torch.equal(sa["summary"][k], sb["summary"][k]), k
    assert (tmp_path / "b" / "checkpoint-8" / "mistake_log" / "mistake_log.json").exists()
    saved = MistakeLog.load(str(tmp_path / "b" / "mistake_log"))
    assert [e.step for e in saved.entries] == [7, 8, 9, 10] and len(saved.history) == 10
    recs = [json.loads(x) for x in open(tmp_path / "a" / "metrics.jsonl")]
    assert all(0 < r["error_mass"] <= 1 and r["topk_residual"] >= 0 for r in recs)


def test_keep_log_with_grad_accum_and_pilot_alone(tmp_path):
    base = tiny_pair("llama")
    model = TransformerCopilot(base.pilot, None, impl="torch")
    tr = Trainer(model, _examples(), _cfg(steps=3, grad_accum=2, ckpt_every=0, keep_log=True, log_steps=2,
                                          log_topk=4, log_pooled_dtype="int8"), str(tmp_path), progress=False)
    tr.train()
    log = model.mistake_log
    assert log.capacity == 4 and [e.step for e in log.entries] == [2, 2, 3, 3]
    assert sorted(log.history) == [1, 2, 3]


def test_inspect_runs_on_a_tiny_run_dir(tmp_path, capsys):
    run = tmp_path / "run"
    words = " ".join(f"w{chr(97 + i // 26)}{chr(97 + i % 26)}" for i in range(VOCAB - 24))
    tok = WordTokenizer.build([words])
    assert tok.vocab_size == VOCAB
    run.mkdir()
    tok.save(str(run / "tokenizer.json"))
    torch.manual_seed(0)
    model = tiny_pair("llama")
    Trainer(model, _examples(), _cfg(steps=4, ckpt_every=0, keep_log=True, log_topk=4),
            str(run / "joint"), progress=False).train()
    assert cli_main(["inspect", str(run), "--top", "3"]) == 0
    text = capsys.readouterr().out
    assert "Mistake Log of joint" in text and "error mass over training" in text
    assert "most frequent confusions" in text and "largest mean error mass" in text
    assert "' w" in text  # decoded with the run's tokenizer
    try:
        import matplotlib  # noqa: F401

        assert (run / "mistakes.png").stat().st_size > 0
    except ImportError:
        assert "pip install" in text
    assert cli_main(["inspect", str(run / "joint"), "--no-plot"]) == 0
    assert "Mistake Log of joint" in capsys.readouterr().out
