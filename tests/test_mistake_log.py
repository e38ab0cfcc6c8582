"""MistakeLog: top-k capture, rebuilt errors, the byte budget, sampling, state_dict and save/load."""

from __future__ import annotations

import pytest
import torch

from tcopilot import logit_capture
from tcopilot.mistake_log import (
    MistakeLog,
    dense_errors,
    dequantise_rows,
    log_bytes_per_token,
    naive_bytes_per_token,
    quantise_rows,
    residual_mass,
    sparse_errors,
)
from tcopilot.testing import assert_same_state


def _case(gen, n=9, d=16, vocab=61, ignore_every=4):
    h = torch.randn(n, d, generator=gen)
    w = torch.randn(vocab, d, generator=gen) * 0.7
    y = torch.randint(0, vocab, (n,), generator=gen)
    if ignore_every:
        y[::ignore_every] = -100
    return h, w, y


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_topk_is_torch_topk_of_materialised_logits_and_residual_mass(gen, impl):
    # Random logits have no ties, so torch.topk's order is unambiguous. With ties the capture returns the
    # lowest ids first, descending by value (tests/kernels/test_logit_capture.py::test_topk_ties_lowest_id_first
    # and the tie case below).
    h, w, y = _case(gen)
    cap = logit_capture(h, w, y, topk=7, impl=impl)
    z = h @ w.T
    want = torch.topk(z, 7, dim=1)
    assert torch.equal(cap.topk_ids, want.indices)
    torch.testing.assert_close(cap.topk_logits, want.values, rtol=1e-5, atol=1e-5)
    p = z.softmax(dim=1)
    torch.testing.assert_close(residual_mass(cap.lse, cap.topk_logits), 1 - p.gather(1, want.indices).sum(1),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_topk_ties_resolve_to_lowest_id(impl):
    w = torch.arange(12.0).repeat_interleave(3)[:, None] / 12.0  # ids 3i..3i+2 share a logit
    h = torch.tensor([[1.0], [-1.0]])
    cap = logit_capture(h, w, torch.tensor([0, 5]), topk=5, impl=impl)
    assert cap.topk_ids.tolist() == [[33, 34, 35, 30, 31], [0, 1, 2, 3, 4]]


def test_rebuilt_errors_equal_onehot_minus_p_on_kept_ids(gen):
    h, w, y = _case(gen, n=12, vocab=40, ignore_every=0)
    k = 6
    cap = logit_capture(h, w, y, topk=k, impl="torch")
    p = (h @ w.T).softmax(dim=1)
    ell = torch.nn.functional.one_hot(y, 40).float() - p
    logp = cap.topk_logits - cap.lse[:, None]
    rebuilt = dense_errors(y, cap.topk_ids, logp, 40)
    kept = torch.zeros_like(ell, dtype=torch.bool).scatter_(1, cap.topk_ids, True)
    torch.testing.assert_close(rebuilt[kept], ell[kept], rtol=1e-5, atol=1e-6)
    # Off the kept ids only the label survives (ell^ = 1 there, ell = 1 - p_y).
    off = ~kept
    label = torch.zeros_like(off).scatter_(1, y[:, None], True)
    assert torch.all(rebuilt[off & ~label] == 0)
    assert torch.all(rebuilt[off & label] == 1)
    # The L1 distance to the exact error is exactly the residual mass.
    torch.testing.assert_close((ell - rebuilt).abs().sum(1), residual_mass(cap.lse, cap.topk_logits),
                               rtol=1e-4, atol=1e-6)
    _, _, ell_sq = sparse_errors(y, cap.topk_ids, logp)
    torch.testing.assert_close(ell_sq, (rebuilt**2).sum(1), rtol=1e-5, atol=1e-6)


def test_int8_and_bf16_quantisation_error(gen):
    x = torch.randn(20, 33, generator=gen) * torch.rand(20, 1, generator=gen) * 5
    x[3] = 0
    q, s = quantise_rows(x, "int8")
    assert q.dtype == torch.int8 and s.shape == (20,)
    err = (dequantise_rows(q, s) - x).abs()
    assert torch.all(err <= s[:, None] / 2 + 1e-6)
    assert torch.all(dequantise_rows(q, s)[3] == 0)
    q, s = quantise_rows(x, "bfloat16")
    assert s is None and q.dtype == torch.bfloat16
    torch.testing.assert_close(dequantise_rows(q, s), x, rtol=1e-2, atol=1e-6)


def _push_random(log, gen, step=None, b=3, length=10, vocab=50, d=8, topk=5):
    ids = torch.randint(0, vocab, (b, length), generator=gen)
    mask = torch.ones(b, length, dtype=torch.long)
    cut = int(torch.randint(2, length, (1,), generator=gen))
    mask[0, cut:] = 0
    tgt = torch.randint(0, vocab, (b * length,), generator=gen)
    tgt[torch.rand(b * length, generator=gen) < 0.4] = -100
    tgt.view(b, length)[mask == 0] = -100
    h = torch.randn(b * length, d, generator=gen)
    w = torch.randn(vocab, d, generator=gen)
    cap = logit_capture(h, w, tgt, topk=topk, impl="torch")
    pooled = torch.randn(b, length, d, generator=gen)
    return log.push(input_ids=ids, attention_mask=mask, targets=tgt, capture=cap, pooled=pooled, step=step,
                    vocab_size=vocab)


def test_buffer_never_exceeds_max_bytes(gen):
    log = MistakeLog(capacity=50, max_bytes=6000, topk=5)
    sizes = []
    for step in range(1, 40):
        length = int(torch.randint(4, 30, (1,), generator=gen))
        _push_random(log, gen, step=step, length=length)
        assert log.nbytes <= log.max_bytes
        assert log.nbytes == sum(e.nbytes for e in log.entries)
        sizes.append(log.nbytes)
        steps = [e.step for e in log.entries]
        assert steps == list(range(step - len(steps) + 1, step + 1))  # the newest, oldest evicted first
    assert log.evicted > 0 and max(sizes) > 4000
    u = log.usage()
    assert u["bytes"] == log.nbytes and u["max_bytes"] == 6000 and u["bytes_per_token"] > 0
    # An entry too large for the budget on its own is refused, the buffer is unchanged.
    before = [e.step for e in log.entries]
    with pytest.warns(UserWarning, match="max_bytes"):
        assert not _push_random(log, gen, step=99, b=8, length=60)
    assert [e.step for e in log.entries] == before and log.dropped == 1
    # The capacity (R entries) binds too.
    small = MistakeLog(capacity=3, topk=5)
    for step in range(1, 8):
        _push_random(small, gen, step=step)
    assert [e.step for e in small.entries] == [5, 6, 7]


def test_entries_store_only_what_they_need(gen):
    log = MistakeLog(topk=4, pooled_dtype="int8", topk_dtype="float16")
    _push_random(log, gen, topk=9)
    e = log[0]
    counted = e.counted()
    assert e.topk_ids.shape == (int(counted.sum()), 4) and e.topk_ids.dtype == torch.int32
    assert e.topk_logp.dtype == torch.float16 and e.lse.shape == (int(counted.sum()),)
    assert e.pooled.shape[0] == int(e.attention_mask.sum()) and e.pooled.dtype == torch.int8
    assert e.pooled_states().shape == (*e.input_ids.shape, 8)
    n_rows, n_counted, n_real = e.input_ids.numel(), int(counted.sum()), e.num_tokens
    assert e.nbytes == n_rows * (4 + 1 + 4) + n_counted * (4 + 4 + 4 * (4 + 2)) + n_real * (8 + 4)


@pytest.mark.parametrize("pooled", ["bfloat16", "int8", None])
def test_state_dict_and_save_load_round_trips_are_exact(gen, tmp_path, pooled):
    log = MistakeLog(capacity=4, topk=5, pooled_dtype=pooled, topk_dtype="bfloat16", seed=3)
    for step in range(1, 7):
        _push_random(log, gen, step=step)
    log.sample()  # advance the generator: its state must travel too
    state = log.state_dict()
    other = MistakeLog(capacity=4, topk=5, pooled_dtype=pooled, topk_dtype="bfloat16")
    other.load_state_dict(state)
    assert_same_state(state, other.state_dict())
    log.save(str(tmp_path / "log"), shard_bytes=1500)  # several shards
    shards = sorted(p.name for p in (tmp_path / "log").iterdir() if p.name.startswith("entries-"))
    assert len(shards) > 1
    loaded = MistakeLog.load(str(tmp_path / "log"))
    assert_same_state(state, loaded.state_dict())
    # The same draws afterwards.
    assert [loaded.sample().step for _ in range(6)] == [log.sample().step for _ in range(6)]
    # Saving again into the same directory replaces the shards.
    log.save(str(tmp_path / "log"))
    assert len([p for p in (tmp_path / "log").iterdir() if p.name.startswith("entries-")]) == 1
    with pytest.raises(ValueError, match="pooled_dtype"):
        MistakeLog(topk=5, pooled_dtype="float32" if pooled != "float32" else "int8",
                   topk_dtype="bfloat16").load_state_dict(state)


def test_sampling_is_uniform_and_seeded(gen):
    log = MistakeLog(capacity=5, topk=3, seed=7)
    for step in range(1, 6):
        _push_random(log, gen, step=step, topk=3)
    draws = [log.sample().step for _ in range(500)]
    counts = torch.bincount(torch.tensor(draws), minlength=6)[1:]
    assert counts.min() > 70  # 100 expected per entry
    fresh = MistakeLog(capacity=5, topk=3, seed=7)
    fresh.entries = log.entries
    assert [fresh.sample().step for _ in range(20)] == draws[:20]


def test_summary_counts_errors_and_confusions(gen):
    log = MistakeLog(topk=3)
    h, w, y = _case(gen, n=30, vocab=12, ignore_every=5)
    cap = logit_capture(h, w, y, topk=3, impl="torch")
    ids = torch.zeros(3, 10, dtype=torch.long)
    log.push(input_ids=ids, attention_mask=None, targets=y, capture=cap, pooled=torch.zeros(3, 10, 4),
             step=4, vocab_size=12)
    counted = y != -100
    p = (h @ w.T).softmax(1)[counted]
    yc = y[counted]
    st = log.step_stats(4)
    assert st["tokens"] == int(counted.sum())
    assert st["err_mass"] == pytest.approx(float((1 - p.gather(1, yc[:, None])).mean()), rel=1e-5)
    assert st["nll"] == pytest.approx(float(-p.gather(1, yc[:, None]).log().mean()), rel=1e-5)
    pred = p.argmax(1)
    want = {}
    for a, b in zip(yc.tolist(), pred.tolist()):
        if a != b:
            want[(a, b)] = want.get((a, b), 0) + 1
    assert log.confusions == want
    assert log.token_count.tolist() == torch.bincount(yc, minlength=12).tolist()
    worst = log.worst_tokens(3, min_count=1)
    assert worst[0][1] >= worst[-1][1]


def test_bytes_arithmetic():
    naive = naive_bytes_per_token(4096, 128256, 32)
    assert naive == 4 * (128256 + 33 * 4096)
    assert log_bytes_per_token(4096, 32, "bfloat16") == 9 + 8 + 32 * 8 + 8192
    assert log_bytes_per_token(4096, 32, "int8") == 9 + 8 + 32 * 8 + 4100


def test_bad_arguments():
    with pytest.raises(ValueError, match="capacity"):
        MistakeLog(capacity=0)
    with pytest.raises(ValueError, match="pooled_dtype"):
        MistakeLog(pooled_dtype="fp4")
    with pytest.raises(ValueError, match="empty"):
        MistakeLog().sample()
    log = MistakeLog(topk=3)
    cap = logit_capture(torch.randn(4, 3), torch.randn(7, 3), torch.tensor([1, 2, 3, -100]))
    with pytest.raises(ValueError, match="topk"):
        log.push(input_ids=torch.zeros(1, 4, dtype=torch.long), attention_mask=None,
                 targets=torch.tensor([1, 2, 3, -100]), capture=cap, pooled=torch.zeros(1, 4, 3))


@pytest.mark.parametrize(
    "name, value, expected",
    [
        ("seed", "x", "an int"),  # was a RuntimeError inside torch.Generator.manual_seed
        ("seed", 1.5, "an int"),
        ("seed", True, "an int"),
        ("seed", 2**64, "an int"),
        ("ignore_index", -100.5, "an int"),  # was accepted: no label ever matched it
        ("ignore_index", "-100", "an int"),
        ("ignore_index", 2**63, "an int"),
        ("capacity", 1.0, "an int >= 1"),
        ("max_bytes", -1, "an int >= 1"),
        ("topk", True, "an int >= 1"),
        ("topk_dtype", torch.float16, "one of"),
        ("pooled_dtype", ["int8"], "one of"),
        ("pin_memory", "no", "a bool or None"),  # bool("no") is True: silently pinned
    ],
)
def test_constructor_rejects_bad_values_naming_them(name, value, expected):
    with pytest.raises(ValueError, match=f"^{name}: expected {expected}"):
        MistakeLog(**{name: value})


def test_constructor_takes_numpy_ints_as_python_ints(tmp_path):
    import numpy as np

    log = MistakeLog(capacity=np.int64(4), max_bytes=np.int32(1 << 20), topk=np.int64(8), seed=np.uint64(7),
                     ignore_index=np.int16(-1), pin_memory=np.False_)
    for key, value in log.config().items():
        assert type(value) in (int, str), (key, value)
    assert (log.capacity, log.topk, log.seed, log.ignore_index, log.pin_memory) == (4, 8, 7, -1, False)
    assert torch.equal(log.generator.get_state(), torch.Generator().manual_seed(7).get_state())
    log.save(str(tmp_path))  # the config is JSON
    assert MistakeLog.load(str(tmp_path)).config() == log.config()
    MistakeLog(seed=-1)  # any int64 or uint64 seed, as torch.Generator takes


def test_push_rejects_a_non_int_ignore_index():
    import numpy as np

    log = MistakeLog(topk=3, pooled_dtype=None)
    y = torch.tensor([1, 2, 3, -100])
    cap = logit_capture(torch.randn(4, 3), torch.randn(7, 3), y, topk=3)
    with pytest.raises(ValueError, match="^ignore_index: expected an int"):
        log.push(input_ids=torch.zeros(1, 4, dtype=torch.long), attention_mask=None, targets=y, capture=cap,
                 ignore_index=-100.0)
    assert log.push(input_ids=torch.zeros(1, 4, dtype=torch.long), attention_mask=None, targets=y, capture=cap,
                    ignore_index=np.int64(-100))


@pytest.mark.parametrize("pooled", ["float32", "int8"])
@pytest.mark.parametrize("ignore_index", [-100, 3])  # 3: a push's own ignore_index, relabelled to the log's -100
def test_push_stores_the_rows_a_boolean_mask_selects(gen, pooled, ignore_index):
    """The rows are gathered with indices of a known size (no host read): the same values and summary as the
    boolean-mask selection ``capture.lse[counted]``, ``pooled[mask]``, confusions ``(y, top1)[top1 != y]``."""
    b, length, vocab, d, k = 3, 9, 12, 5, 4
    ids = torch.randint(0, vocab, (b, length), generator=gen)
    mask = (torch.rand(b, length, generator=gen) < 0.7).long()
    y = torch.randint(0, vocab, (b * length,), generator=gen)
    y[torch.rand(b * length, generator=gen) < 0.3] = ignore_index
    cap = logit_capture(torch.randn(b * length, d, generator=gen), torch.randn(vocab, d, generator=gen), y,
                        topk=k + 2, impl="torch", ignore_index=ignore_index)
    states = torch.randn(b, length, d, generator=gen)
    log = MistakeLog(topk=k, pooled_dtype=pooled)
    log.push(input_ids=ids, attention_mask=mask, targets=y.int(), capture=cap, pooled=states, step=2,
             vocab_size=vocab, ignore_index=ignore_index)
    e = log[0]
    counted = y != ignore_index
    assert torch.equal(e.targets.reshape(-1), y.masked_fill(~counted, -100).int())
    assert torch.equal(e.lse, cap.lse[counted]) and torch.equal(e.p_target, cap.p_target[counted])
    assert torch.equal(e.topk_ids, cap.topk_ids[counted, :k].int())
    assert torch.equal(e.topk_logp, cap.topk_logits[counted, :k] - cap.lse[counted][:, None])
    q, scale = quantise_rows(states.reshape(b * length, d)[mask.reshape(-1) == 1], pooled)
    assert torch.equal(e.pooled, q) and (scale is None or torch.equal(e.pooled_scale, scale))
    placed = torch.zeros(b * length, d)
    placed[mask.reshape(-1) == 1] = dequantise_rows(q, scale)
    assert torch.equal(e.pooled_states(), placed.view(b, length, d))
    assert torch.equal(e.sparse_errors()[1][:, 0], y[counted])  # the labels of the counted rows, in order
    yc, top1 = y[counted], cap.topk_ids[counted, 0]
    wrong = top1 != yc
    want = {}
    for a, p in zip(yc[wrong].tolist(), top1[wrong].tolist()):
        want[(a, p)] = want.get((a, p), 0) + 1
    stats = log.step_stats(2)
    assert log.confusions == want and stats["tokens"] == int(counted.sum())
    assert log.token_count.tolist() == torch.bincount(yc, minlength=vocab).tolist()
    assert stats["err_mass"] == float((1 - cap.p_target[counted]).sum()) / int(counted.sum())  # same sums
