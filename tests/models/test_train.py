import json

import pytest
import torch

from tcopilot.testing import tiny_pair
from tcopilot.train import TrainConfig, Trainer, batch_indices, cosine_with_warmup


def _examples(n=48, L=12, vocab=97, seed=0):
    """A learnable toy language: each sequence counts up by a fixed stride modulo the vocabulary."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        start = int(torch.randint(1, vocab, (1,), generator=g))
        stride = int(torch.randint(1, 4, (1,), generator=g))
        length = int(torch.randint(L - 3, L + 1, (1,), generator=g))
        ids = [(start + stride * i) % (vocab - 1) + 1 for i in range(length)]
        labels = [-100] * 2 + ids[2:]
        out.append({"input_ids": ids, "labels": labels})
    return out


def _cfg(**kw):
    base = dict(
        steps=30, batch_size=8, lr_pilot=3e-3, lr_copilot=3e-3, warmup_steps=3, log_every=1, ckpt_every=0, seed=0
    )
    base.update(kw)
    return TrainConfig(**base)


def test_training_lowers_both_losses(tmp_path):
    torch.manual_seed(0)
    model = tiny_pair("llama")
    tr = Trainer(model, _examples(), _cfg(steps=40, lr_pilot=1e-2, lr_copilot=1e-2), str(tmp_path), progress=False)
    tr.train()
    recs = [json.loads(x) for x in open(tmp_path / "metrics.jsonl")]
    first, last = recs[0], recs[-1]
    assert last["pilot_loss"] < 0.7 * first["pilot_loss"]
    assert last["copilot_loss"] < first["copilot_loss"]
    assert (tmp_path / "config.json").exists()


def test_kill_and_resume_gives_identical_state(tmp_path):
    ex = _examples()
    torch.manual_seed(0)
    ref = tiny_pair("llama")
    Trainer(ref, ex, _cfg(steps=12, ckpt_every=4), str(tmp_path / "a"), progress=False).train()

    torch.manual_seed(0)
    m1 = tiny_pair("llama")
    Trainer(m1, ex, _cfg(steps=12, ckpt_every=4), str(tmp_path / "b"), progress=False).train(stop_after=6)
    # "killed" after step 6: the last checkpoint is step 4; a new process starts from fresh weights
    torch.manual_seed(123)
    m2 = tiny_pair("llama", seed=5)
    tr = Trainer(m2, ex, _cfg(steps=12, ckpt_every=4), str(tmp_path / "b"), progress=False)
    tr.train()
    assert tr.step == 12
    for (n, a), (_, b) in zip(ref.state_dict().items(), m2.state_dict().items()):
        assert torch.equal(a, b), n
    ckpts = sorted(p.name for p in (tmp_path / "b").iterdir() if p.name.startswith("checkpoint-"))
    assert ckpts == ["checkpoint-12", "checkpoint-8"]


def test_gradient_accumulation_matches_full_batch_for_the_pilot(tmp_path):
    ex = _examples()
    grads = []
    for accum in (1, 2, 4):
        torch.manual_seed(0)
        model = tiny_pair("llama")
        tr = Trainer(model, ex, _cfg(grad_accum=accum), str(tmp_path / str(accum)), progress=False)
        tr.accumulate_gradients()
        grads.append([p.grad.clone() for p in model.pilot.parameters()])
    for other in grads[1:]:
        for a, b in zip(grads[0], other):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


def test_schedule_and_batches_are_pure_functions():
    f = cosine_with_warmup(10, 100, 0.1)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0) and f(100) == pytest.approx(0.1)
    assert batch_indices(50, 8, 0, 3) == batch_indices(50, 8, 0, 3)
    assert batch_indices(50, 8, 0, 3) != batch_indices(50, 8, 1, 3)


def test_config_errors(tmp_path):
    with pytest.raises(ValueError, match="batch_size"):
        _cfg(batch_size=6, grad_accum=4).validate()
    with pytest.raises(ValueError, match="lr_pilot"):
        _cfg(lr_pilot=float("nan")).validate()
    with pytest.raises(ValueError, match="examples"):
        Trainer(tiny_pair("llama"), _examples(4), _cfg(), str(tmp_path))
