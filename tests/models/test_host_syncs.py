"""Host reads (device synchronisations) of a training forward.

On CUDA every read of a tensor's values on the host (``.item()``, ``int(t)``, ``bool(t)``, ``.tolist()``, a
boolean-mask index, which calls ``nonzero``) waits for the GPU to catch up and drains the launch queue. The
checks here count them on the CPU: ``TransformerCopilot.forward`` reads the host once (the range check of the ids
and the labels together, which also reads a tensor ``num_items_in_batch`` and, when a Mistake Log records, the rows
it keeps), its backward never; the label checks of the fused ops read once, or not at all with
``check_labels=False``; a Mistake Log push reads once (its sizes), or not at all inside the forward; a training
step of either trainer reads only in its forwards between logging steps.
"""

from __future__ import annotations

import importlib.util
import json
import os
from contextlib import contextmanager
from types import SimpleNamespace
from unittest import mock

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import tcopilot
from tcopilot import Copilot, MistakeLog, TransformerCopilot, copilot_error_loss, logit_capture
from tcopilot._validation import check_labels
from tcopilot.pilot import check_token_ids, shift_labels
from tcopilot.testing import VOCAB, assert_same_state, left_padded_prompts, tiny_pair, tiny_pilot

IGNORE = -100
# The Copilot's attention on its Triton path (what "auto" takes on CUDA) runs in the interpreter on the CPU.
needs_interpreter = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None or os.environ.get("TRITON_INTERPRET") != "1",
    reason="needs Triton with TRITON_INTERPRET=1",
)

aten = torch.ops.aten
# Scalar reads (.item(), int(t), bool(t)) and ops whose output shape depends on the values.
_READ_OPS = (aten._local_scalar_dense.default, aten.nonzero.default, aten.masked_select.default)
_INDEX_OPS = (aten.index.Tensor, aten.index_put.default, aten.index_put_.default)


def _reads_host(func, args) -> bool:
    if func in _INDEX_OPS:  # a boolean-mask index (labels[mask]) calls nonzero inside the op
        return any(i is not None and i.dtype in (torch.bool, torch.uint8) for i in args[1])
    return func in _READ_OPS


class _ReadCounter(TorchDispatchMode):
    count = 0

    def __init__(self, ignore=None):
        super().__init__()
        self.ignore = ignore

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += _reads_host(func, args) and not (self.ignore is not None and self.ignore(func, args))
        return func(*args, **(kwargs or {}))


@contextmanager
def host_reads(ignore=None):
    """Counts the host reads inside the block. ``Tensor.tolist`` is counted by a wrapper: on CPU tensors it reads
    the memory without a dispatched op (on CUDA it is a device-to-host copy, a synchronisation like the others).
    ``ignore(func, args)``: True for a dispatched read not to count (reads of tensors that live on the host on every
    device, see :func:`_optimizer_steps`)."""
    counter, real_tolist = _ReadCounter(ignore), torch.Tensor.tolist

    def tolist(t):
        counter.count += 1
        return real_tolist(t)

    with mock.patch.object(torch.Tensor, "tolist", tolist), counter:
        yield counter


def test_host_reads_counts_each_kind_of_read():
    t = torch.tensor([3, -1, 4])
    for read in (lambda: t.sum().item(), lambda: int(t[0]), lambda: bool(t.any()), lambda: t.tolist(),
                 lambda: t[t > 0], lambda: t.nonzero(), lambda: t.masked_select(t > 0)):
        with host_reads() as reads:
            read()
        assert reads.count == 1
    with host_reads() as reads:
        (t * 2 + t.amax()).sum()
        t[torch.tensor([0, 2])]
    assert reads.count == 0


# ---------------------------------------------------------------------------------------------------------
# TransformerCopilot.forward
# ---------------------------------------------------------------------------------------------------------


def _model(attention_impl: str, impl: str = "torch") -> TransformerCopilot:
    """The tiny Llama pair with the fused ops on ``impl`` and the Copilot's attention on ``attention_impl``.

    The Pilot uses eager attention: with SDPA, transformers' mask builder reads a padded mask back twice itself
    (``_ignore_causal_mask_sdpa``) to decide whether the mask can be skipped, reads that are not the package's.
    """
    pilot = tiny_pilot("llama")
    pilot.set_attn_implementation("eager")
    model = TransformerCopilot(pilot, Copilot.from_pilot(pilot, attention_impl=attention_impl), impl=impl)
    return model.train()


def _left_padded_batch():
    ids, mask = left_padded_prompts()
    return ids, mask, ids.masked_fill(mask == 0, IGNORE)


def _forward_backward_reads(model):
    """``(output, host reads of the forward, host reads of its backward)`` on the left-padded batch."""
    ids, mask, labels = _left_padded_batch()
    with host_reads() as forward:
        out = model(ids, attention_mask=mask, labels=labels)
    with host_reads() as backward:
        out.loss.backward()
    return out, forward.count, backward.count


@needs_interpreter
@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_training_forward_reads_the_host_once_and_its_backward_never(impl):
    """What a GPU runs with impl="auto" (the Triton kernels, here in the interpreter) and with the fused ops on
    their PyTorch path: a left-padded batch with labels, no Mistake Log."""
    model = _model("triton", impl)
    out, forward, backward = _forward_backward_reads(model)
    assert (forward, backward) == (1, 0)
    assert out.copilot_loss is not None and model.copilot.error_out.weight.grad is not None


@pytest.mark.parametrize("blocked", [False, True], ids=["one_sdpa_call", "blocked"])
def test_torch_attention_reads_nothing_in_one_call_and_its_block_plan_when_blocked(blocked, monkeypatch):
    """log_attention's PyTorch path (the Copilot's attention on the CPU with "auto"): one SDPA call reads nothing;
    the blocked loop (scores over its budget) reads its block plan once per call, forward and backward.
    Everything else of the forward is the one read of the range check."""
    if blocked:
        from tcopilot.kernels.log_attention import torch_impl

        monkeypatch.setattr(torch_impl, "_SCORE_BUDGET", 1)
    model = _model("torch")
    ids, mask, labels = _left_padded_batch()
    layers = model.copilot.config.num_hidden_layers if blocked else 0
    with host_reads() as reads:
        out = model(ids, attention_mask=mask, labels=labels)
    assert reads.count == 1 + layers
    with host_reads() as reads:
        out.loss.backward()
    assert reads.count == layers


def test_pilot_only_forward_reads_the_host_once():
    pilot = tiny_pilot("llama")
    pilot.set_attn_implementation("eager")
    model = TransformerCopilot(pilot, None, impl="torch").train()
    ids, mask, _ = _left_padded_batch()
    with host_reads() as reads:
        out = model(ids, attention_mask=mask)  # labels from the ids
    assert reads.count == 1
    with host_reads() as reads:
        out.loss.backward()
    assert reads.count == 0


def test_num_tokens_is_read_when_asked():
    model = tiny_pair("llama")
    ids, mask, labels = _left_padded_batch()
    out = model(ids, attention_mask=mask, labels=labels)
    want = int((shift_labels(labels, IGNORE) != IGNORE).sum())
    assert out.num_tokens_tensor.dim() == 0 and out.num_tokens_tensor.dtype == torch.int64
    with host_reads() as reads:
        n = out.num_tokens
    assert reads.count == 1 and type(n) is int and n == want


def test_forward_still_refuses_bad_ids_and_labels_in_its_one_read():
    model = tiny_pair("llama")
    ids, mask, labels = _left_padded_batch()
    vocab = model.pilot.get_output_embeddings().weight.shape[0]
    for bad_label, got in ((vocab, vocab), (-5, -5)):
        bad = labels.clone()
        bad[0, 3] = bad_label
        with host_reads() as reads, pytest.raises(
            ValueError, match=rf"^labels: expected values in \[0, {vocab}\) or ignore_index=-100, got {got}$"
        ):
            model(ids, attention_mask=mask, labels=bad)
        assert reads.count == 1
    bad = ids.clone()
    bad[1, 4] = VOCAB
    with host_reads() as reads, pytest.raises(ValueError, match=rf"^input_ids: expected token ids in \[0, {VOCAB}\)"):
        model(bad, attention_mask=mask, labels=labels)
    assert reads.count == 1


# ---------------------------------------------------------------------------------------------------------
# check_labels / check_token_ids, and check_labels=False of the fused ops
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "labels, ignore_index, bad",
    [
        ([3, IGNORE, 10], IGNORE, 10),  # label = V
        ([3, -5, IGNORE], IGNORE, -5),  # negative, not ignore_index
        ([-1, 2, 3], IGNORE, -1),
        ([3, 2, 7], 7, None),  # ignore_index inside [0, V) is still ignored
        ([IGNORE, IGNORE], IGNORE, None),  # every row ignored
    ],
)
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.int16])
def test_check_labels_reads_once(labels, ignore_index, bad, dtype):
    t = torch.tensor(labels, dtype=dtype)
    with host_reads() as reads:
        if bad is None:
            check_labels("labels", t, 10, ignore_index)
        else:
            want = rf"^labels: expected values in \[0, 10\) or ignore_index={ignore_index}, got {bad}$"
            with pytest.raises(ValueError, match=want):
                check_labels("labels", t, 10, ignore_index)
    assert reads.count == 1


def test_check_labels_uint8_with_ignore_index_outside_the_dtype():
    """-100 is no uint8 value: no label equals it (a comparison in uint8 would wrap it to 156)."""
    with pytest.raises(ValueError, match=r"^y: expected values in \[0, 100\) or ignore_index=-100, got 156$"):
        check_labels("y", torch.tensor([1, 156, 2], dtype=torch.uint8), 100, IGNORE)
    check_labels("y", torch.tensor([1, 99, 0], dtype=torch.uint8), 100, IGNORE)
    check_labels("y", torch.tensor([1, 255], dtype=torch.uint8), 100, 255)
    with pytest.raises(ValueError, match="got 300$"):
        check_labels("y", torch.tensor([300, 5], dtype=torch.int16), 100, 2**40)


def test_check_labels_empty_reads_nothing():
    with host_reads() as reads:
        check_labels("labels", torch.empty(0, dtype=torch.int64), 10, IGNORE)
    assert reads.count == 0


def test_check_token_ids_reads_once():
    pilot = tiny_pilot("llama")
    ids, _ = left_padded_prompts()
    with host_reads() as reads:
        check_token_ids(pilot, ids)
    assert reads.count == 1
    for bad_id in (VOCAB, -1):
        bad = ids.clone()
        bad[2, 5] = bad_id
        with host_reads() as reads, pytest.raises(ValueError, match=rf"^input_ids: expected .* got {bad_id}$"):
            check_token_ids(pilot, bad)
        assert reads.count == 1


def _capture_inputs(n=12, d=8, v=30, c=3):
    g = torch.Generator().manual_seed(0)
    h, w = torch.randn(n, d, generator=g), torch.randn(v, d, generator=g)
    a, b_w, b_b = torch.randn(c, v, generator=g), torch.randn(v, c, generator=g), torch.randn(v, generator=g)
    y = torch.randint(0, v, (n,), generator=g)
    y[::4] = IGNORE
    return h, w, torch.cat([a.t(), b_w, b_b[:, None]], 1), y, torch.randn(n, c, generator=g), b_w, b_b


def test_fused_ops_skip_the_label_read_with_check_labels_false():
    h, w, values, y, g, b_w, b_b = _capture_inputs()
    with host_reads() as reads:
        cap = logit_capture(h, w, y, values, impl="torch", check_labels=False)
        loss = copilot_error_loss(g, b_w, b_b, cap, y, impl="torch", check_labels=False)
    assert reads.count == 0
    with host_reads() as reads:
        want_cap = logit_capture(h, w, y, values, impl="torch")
    assert reads.count == 1
    with host_reads() as reads:
        want = copilot_error_loss(g, b_w, b_b, want_cap, y, impl="torch")
    assert reads.count == 1
    for got_t, want_t in zip(cap, want_cap):
        torch.testing.assert_close(got_t, want_t, rtol=0, atol=0)
    torch.testing.assert_close(loss, want, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------------
# num_items_in_batch as a tensor (what transformers.Trainer passes)
# ---------------------------------------------------------------------------------------------------------


def test_forward_reads_a_tensor_num_items_with_its_range_check():
    """Read with the ids and the labels, checked by logit_capture as that number: no .item() of its own."""
    model = _model("torch")
    model.copilot = None  # the Pilot's loss is the one num_items_in_batch divides
    ids, mask, labels = _left_padded_batch()
    want = model(ids, attention_mask=mask, labels=labels, num_items_in_batch=7).loss
    for n in (torch.tensor(7), torch.tensor(7, dtype=torch.int32), torch.tensor([7.0]), torch.tensor(7.0).bfloat16()):
        with host_reads() as reads:
            got = model(ids, attention_mask=mask, labels=labels, num_items_in_batch=n).loss
        assert reads.count == 1, n
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    for bad, shown in ((torch.tensor(0), "0"), (torch.tensor(-2.5), "-2.5"), (torch.tensor(float("nan")), "nan")):
        with host_reads() as reads, pytest.raises(
            ValueError, match=rf"^num_items_in_batch: expected a finite number > 0, got {shown}$"
        ):
            model(ids, attention_mask=mask, labels=labels, num_items_in_batch=bad)
        assert reads.count == 1


def test_logit_capture_reads_a_tensor_num_items_with_its_labels():
    h, w, values, y, *_ = _capture_inputs()
    want = logit_capture(h, w, y, values, impl="torch", num_items_in_batch=5)
    for n, expected_reads in ((torch.tensor(5), 1), (torch.tensor(5.0, dtype=torch.float64), 1)):
        with host_reads() as reads:
            cap = logit_capture(h, w, y, values, impl="torch", num_items_in_batch=n)
        assert reads.count == expected_reads
        torch.testing.assert_close(cap.loss, want.loss, rtol=0, atol=0)
    with host_reads() as reads:  # without the label check, the value alone is read
        logit_capture(h, w, y, values, impl="torch", num_items_in_batch=torch.tensor(5), check_labels=False)
    assert reads.count == 1
    with host_reads() as reads, pytest.raises(ValueError, match=r"^num_items_in_batch: .* got 0$"):
        logit_capture(h, w, y, values, impl="torch", num_items_in_batch=torch.tensor(0))
    assert reads.count == 1
    with pytest.raises(ValueError, match=r"^labels: expected values in \[0, 30\)"):  # the labels' error first
        logit_capture(h, w, y.masked_fill(y == IGNORE, 30), impl="torch", num_items_in_batch=torch.tensor(0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_number_denominator_equals_as_tensor(dtype):
    """mean_denom fills a number in on the device (as_tensor copies it over from the host): the same value."""
    import numpy as np

    from tcopilot.kernels.logit_capture.autograd import mean_denom

    hidden = torch.zeros(1, 1, dtype=dtype)
    for v in (1, 3, 2**24 + 1, 2**31 + 7, 2**53 + 1, 2**62 + 3, 10**30, 0.1, 1e-46, 3.4028235e38, 1e39, np.int64(7),
              np.float32(0.3), np.float16(0.1)):
        got = mean_denom(v, "mean", hidden)
        assert got.dtype == dtype and got.shape == ()
        assert torch.equal(got, torch.as_tensor(v, dtype=dtype)), v


# ---------------------------------------------------------------------------------------------------------
# The Mistake Log
# ---------------------------------------------------------------------------------------------------------


def _recording_model(attention_impl: str = "triton", ignore_index: int = IGNORE, **log_kw) -> TransformerCopilot:
    model = _model(attention_impl)
    model.mistake_log = MistakeLog(capacity=4, topk=4, pooled_dtype="int8", ignore_index=ignore_index, **log_kw)
    return model


def _capture_for_push(gen_seed=0, b=3, length=6, vocab=20, d=8):
    g = torch.Generator().manual_seed(gen_seed)
    ids = torch.randint(0, vocab, (b, length), generator=g)
    mask = (torch.rand(b, length, generator=g) < 0.7).long()
    tgt = torch.randint(0, vocab, (b * length,), generator=g)
    tgt[torch.rand(b * length, generator=g) < 0.4] = IGNORE
    cap = logit_capture(torch.randn(b * length, d, generator=g), torch.randn(vocab, d, generator=g), tgt, topk=5,
                        impl="torch")
    return dict(input_ids=ids, attention_mask=mask, targets=tgt, capture=cap,
                pooled=torch.randn(b, length, d, generator=g), vocab_size=vocab)


def test_push_reads_the_host_once_or_never_with_its_counts():
    """One read of the entry's sizes (counted and real rows); none when the caller passes them. The summary stays
    on the device until flush."""
    inputs = _capture_for_push()
    log = MistakeLog(topk=3, pooled_dtype="int8")
    with host_reads() as reads:
        log.push(**inputs)
    assert reads.count == 1
    counts = (int((inputs["targets"] != IGNORE).sum()), int(inputs["attention_mask"].sum()))
    other = MistakeLog(topk=3, pooled_dtype="int8")
    with host_reads() as reads:
        other.push(**inputs, counts=counts)
    assert reads.count == 0
    assert_same_state(other.state_dict(), log.state_dict())


def test_flush_copies_the_pending_pushes_in_one_transfer(monkeypatch):
    log = MistakeLog(topk=3, pooled_dtype=None)
    for seed in range(5):
        log.push(**_capture_for_push(seed), step=1 + seed // 2)
    calls = []
    real_cpu = torch.Tensor.cpu
    monkeypatch.setattr(torch.Tensor, "cpu", lambda t, *a, **k: calls.append(t.shape) or real_cpu(t, *a, **k))
    log.flush()
    assert len(calls) == 1 and not log._pending


@needs_interpreter
def test_recording_forward_reads_the_host_once_and_its_backward_never():
    """The Mistake Log's rows are counted in the forward's one read, so the push reads nothing."""
    model = _recording_model()
    _forward_backward_reads(model)
    _, forward, backward = _forward_backward_reads(model)
    assert (forward, backward) == (1, 0)
    assert len(model.mistake_log) == 2


@needs_interpreter
def test_a_log_with_another_ignore_index_counts_its_rows_itself():
    """The push relabels the targets to the log's ignore_index: the forward leaves the counting to it (its one
    read)."""
    model = _recording_model(ignore_index=-1)
    ids, mask, labels = _left_padded_batch()
    with host_reads() as reads:
        model(ids, attention_mask=mask, labels=labels)
    assert reads.count == 2


@needs_interpreter
def test_replay_forward_reads_the_host_once_besides_the_draw():
    """log_mode="replay": the forward's one read, the sampler's draw (a CPU generator: a host tensor on every
    device, no synchronisation) and nothing else: the stored rows are placed with indices sized by the entry's
    shapes. The backward reads nothing."""
    model = _recording_model()
    model.log_mode = "replay"
    _forward_backward_reads(model)
    _, forward, backward = _forward_backward_reads(model)
    assert (forward, backward) == (2, 0)
    assert model.copilot.error_out.weight.grad is not None


def test_recording_forward_stores_what_a_push_that_reads_its_counts_stores():
    model = _recording_model("torch")
    ids, mask, labels = _left_padded_batch()
    seen = []
    real_push = model.mistake_log.push

    def push(**kw):
        seen.append(kw)
        return real_push(**kw)

    model.mistake_log.push = push
    model(ids, attention_mask=mask, labels=labels)
    kw = dict(seen[0])
    assert kw.pop("counts") == (int((labels[:, 1:] != IGNORE).sum()), int(mask.sum()))
    ref = MistakeLog(capacity=4, topk=4, pooled_dtype="int8")
    ref.push(**kw)
    assert_same_state(model.mistake_log.state_dict(), ref.state_dict())


# ---------------------------------------------------------------------------------------------------------
# A training step of the trainers
# ---------------------------------------------------------------------------------------------------------


def _optimizer_steps(*optimizers):
    """``ignore`` for :func:`host_reads`: torch's AdamW reads each parameter's step count, a CPU tensor on every
    device (without ``capturable`` / ``fused``): no synchronisation. ``optimizers``: callables giving them (the
    Trainers create theirs late)."""

    def ignore(func, args):
        if func is not aten._local_scalar_dense.default:
            return False
        return any(args[0] is s.get("step") for get in optimizers for s in get().state.values())

    return ignore


def _train_examples(n=16, length=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(1, VOCAB, (int(torch.randint(length - 3, length + 1, (1,), generator=g)),), generator=g)
        prompt = int(torch.randint(1, 4, (1,), generator=g))
        out.append({"input_ids": ids.tolist(), "labels": [IGNORE] * prompt + ids[prompt:].tolist()})
    return out


@needs_interpreter
@pytest.mark.parametrize("keep_log", [False, True])
def test_trainer_step_reads_only_in_its_forwards_between_logging_steps(tmp_path, monkeypatch, keep_log):
    """Our Trainer, 2 micro-batches per step, a record every 3 steps, stopped after 4: a step reads the host in its
    2 forwards and twice on host tensors (the batch's indices and its token count, from the collated CPU batch);
    the logged step 3 and the last one (whose record train returns) read the record once more: losses and gradient
    norms together (and, with a Mistake Log, the log's flush at those steps)."""
    import tcopilot.train
    from tcopilot.train import TrainConfig, Trainer

    model = _model("triton")
    cfg = TrainConfig(steps=5, batch_size=4, grad_accum=2, warmup_steps=1, log_every=3, ckpt_every=0, seed=0,
                      keep_log=keep_log, log_topk=4)
    tr = Trainer(model, _train_examples(), cfg, str(tmp_path), progress=False)
    starts, real_indices = [], tcopilot.train.batch_indices

    def indices(*args):  # the first thing a step does: draw its batch
        starts.append(reads.count)
        return real_indices(*args)

    monkeypatch.setattr(tcopilot.train, "batch_indices", indices)
    with host_reads(_optimizer_steps(lambda: tr.opt_pilot, lambda: tr.opt_copilot)) as reads:
        last = tr.train(stop_after=4)
    per_step = [b - a for a, b in zip(starts, [*starts[1:], reads.count])]
    between = 2 + cfg.grad_accum
    if keep_log:  # the logged steps also fold in the log's pending pushes (reads of host tensors after one copy)
        assert per_step[:2] == [between] * 2 and min(per_step[2:]) > between + 1
    else:
        assert per_step == [between, between, between + 1, between + 1]
    assert last["step"] == 4 and isinstance(last["pilot_loss"], float) and isinstance(last["grad_norm_copilot"], float)
    assert [json.loads(x)["step"] for x in open(tmp_path / "metrics.jsonl")] == [3]


@needs_interpreter
def test_copilot_trainer_step_reads_only_in_its_forwards(tmp_path):
    """CopilotTrainer (transformers.Trainer) with a tensor num_items_in_batch, 2 micro-batches per step: the 2
    forwards' reads (the count is read with their range check), nothing in clipping (the per-model norms are read
    when logged). ``logging_nan_inf_filter=False``: the stock Trainer's own NaN filter reads each micro-batch's loss
    (2 more reads per micro-batch, not the package's)."""
    pytest.importorskip("accelerate")
    from transformers import TrainerCallback, TrainingArguments

    from tcopilot.data.prompts import collate
    from tcopilot.integrations import CopilotTrainer

    model = _model("triton")
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2, gradient_accumulation_steps=2,
        learning_rate=3e-3, max_grad_norm=1.0, logging_steps=2, save_strategy="no", report_to=[], use_cpu=True,
        disable_tqdm=True, seed=0, dataloader_num_workers=0, train_sampling_strategy="sequential",
        logging_nan_inf_filter=False,
    )

    class Count(TrainerCallback):
        def __init__(self):
            self.counts = []

        def on_step_begin(self, args, state, control, **kw):
            self.block = host_reads(_optimizer_steps(lambda: tr.optimizer))
            self.reads = self.block.__enter__()

        def on_step_end(self, args, state, control, **kw):
            self.block.__exit__(None, None, None)
            self.counts.append(self.reads.count)

    count = Count()
    tr = CopilotTrainer(model=model, args=args, train_dataset=_train_examples(),
                        data_collator=lambda rows: collate(rows, 0), callbacks=[count], copilot_max_grad_norm=1.0)
    tr.train()
    assert count.counts == [2, 2]
    logged = [r for r in tr.state.log_history if "pilot_loss" in r]
    assert len(logged) == 1 and all(isinstance(logged[0][k], float) for k in ("grad_norm_pilot", "grad_norm_copilot"))


# ---------------------------------------------------------------------------------------------------------
# GPU: the synchronisations CUDA itself reports (blocking copies included, which the CPU counter cannot see)


_TORCH_DIR = os.path.dirname(torch.__file__)
_PACKAGE_DIR = os.path.dirname(tcopilot.__file__)


@contextmanager
def cuda_syncs():
    """What ``torch.cuda.set_sync_debug_mode("warn")`` reports inside the block, split by who asked: the
    innermost Python frame outside torch's own files is in this package (``box.ours``) or elsewhere
    (``box.others``: e.g. transformers 5.17's eager mask builds a scalar with ``torch.tensor(0.0, device=...)``,
    a blocking copy; 5.24 no longer does). The stack is taken when the warning is emitted, so a sync inside a
    torch function that this package calls counts as ours."""
    import traceback
    import warnings

    box = SimpleNamespace(ours=[], others=[])

    def record(message, category, filename, lineno, file=None, line=None):
        if "synchroniz" not in str(message).lower():
            return
        frames = [f for f in traceback.extract_stack()[:-1] if not f.filename.startswith(_TORCH_DIR)
                  and "warnings" not in os.path.basename(f.filename)]  # fmt: skip
        where = frames[-1] if frames else None
        mine = where is not None and where.filename.startswith(_PACKAGE_DIR)
        text = f"{where.filename}:{where.lineno}: {message}" if where else str(message)
        (box.ours if mine else box.others).append(text)

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record  # restored by catch_warnings
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield box
        finally:
            torch.cuda.set_sync_debug_mode("default")
            torch.cuda.synchronize()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("recording", [False, True], ids=["plain", "mistake_log"])
def test_gpu_training_step_synchronises_once(recording):
    model = (_recording_model("auto") if recording else _model("auto", "auto")).cuda()
    ids, mask, labels = (t.cuda() for t in _left_padded_batch())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, capturable=True)
    for _ in range(2):  # warm-up: Triton compilation and autotuning synchronise
        model(ids, attention_mask=mask, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    with cuda_syncs() as forward_syncs:
        out = model(ids, attention_mask=mask, labels=labels)
    with cuda_syncs() as rest:
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    if forward_syncs.others or rest.others:  # the libraries' own, reported and not counted against the package
        print("synchronisations outside tcopilot:", forward_syncs.others + rest.others)
    assert len(forward_syncs.ours) == 1, forward_syncs.ours
    assert not rest.ours, rest.ours


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("where", ["cpu", "cuda"])
def test_gpu_forward_with_a_count_tensor_synchronises_once(where):
    # num_items_in_batch as a tensor: on the device, read with the forward's one read; on the host, read there
    # (no synchronisation) instead of being copied to the device inside the loss.
    model = _model("auto", "auto").cuda()
    ids, mask, labels = (t.cuda() for t in _left_padded_batch())
    items = (labels[:, 1:] != IGNORE).sum().to(where)
    for _ in range(2):  # warm-up
        model(ids, attention_mask=mask, labels=labels, num_items_in_batch=items).loss.backward()
    with cuda_syncs() as syncs:
        out = model(ids, attention_mask=mask, labels=labels, num_items_in_batch=items)
    assert len(syncs.ours) == 1, syncs.ours
    want = model(ids, attention_mask=mask, labels=labels, num_items_in_batch=int(items))
    torch.testing.assert_close(out.loss, want.loss)
