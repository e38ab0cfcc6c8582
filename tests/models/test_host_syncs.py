"""Host reads (device synchronisations) of a training forward.

On CUDA every read of a tensor's values on the host (``.item()``, ``int(t)``, ``bool(t)``, ``.tolist()``, a
boolean-mask index, which calls ``nonzero``) waits for the GPU to catch up and drains the launch queue. The
checks here count them on the CPU: ``TransformerCopilot.forward`` reads the host once (the range check of the ids
and the labels together), its backward never; the label checks of the fused ops read once, or not at all with
``check_labels=False``.
"""

from __future__ import annotations

import importlib.util
import os
from contextlib import contextmanager
from unittest import mock

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from tcopilot import Copilot, TransformerCopilot, copilot_error_loss, logit_capture
from tcopilot._validation import check_labels
from tcopilot.pilot import check_token_ids, shift_labels
from tcopilot.testing import VOCAB, left_padded_prompts, tiny_pair, tiny_pilot

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

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += _reads_host(func, args)
        return func(*args, **(kwargs or {}))


@contextmanager
def host_reads():
    """Counts the host reads inside the block. ``Tensor.tolist`` is counted by a wrapper: on CPU tensors it reads
    the memory without a dispatched op (on CUDA it is a device-to-host copy, a synchronisation like the others)."""
    counter, real_tolist = _ReadCounter(), torch.Tensor.tolist

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


@needs_interpreter
@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_training_forward_reads_the_host_once_and_its_backward_never(impl):
    """What a GPU runs with impl="auto" (the Triton kernels, here in the interpreter) and with the fused ops on
    their PyTorch path: a left-padded batch with labels, no Mistake Log."""
    model = _model("triton", impl)
    ids, mask, labels = _left_padded_batch()
    with host_reads() as reads:
        out = model(ids, attention_mask=mask, labels=labels)
    assert reads.count == 1
    with host_reads() as reads:
        out.loss.backward()
    assert reads.count == 0
    assert out.copilot_loss is not None and model.copilot.error_out.weight.grad is not None


def test_torch_attention_adds_one_read_per_copilot_layer():
    """log_attention's PyTorch path (the Copilot's attention on the CPU with "auto") reads its block plan once per
    call (forward and backward); everything else of the forward is the one read of the range check."""
    model = _model("torch")
    ids, mask, labels = _left_padded_batch()
    layers = model.copilot.config.num_hidden_layers
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
