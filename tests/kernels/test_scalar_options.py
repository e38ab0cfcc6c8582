"""Scalar options of the public ops: numpy scalars are numbers, values the compute dtype cannot hold are errors.

A training script often carries its options through numpy (``np.float32(0.1)`` from a config array, ``np.int64``
from an argmax): they must work exactly as the Python numbers. Ints past int64 and floats past the fp32 range
(where the op computes in fp32) must give a ValueError naming the option, not an OverflowError from deep inside
or a silent NaN. All on the PyTorch paths, CPU.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tcopilot import copilot_error_loss, log_attention, logit_capture, rectified_next_token


def _capture_inputs():
    g = torch.Generator().manual_seed(0)
    h, w = torch.randn(7, 16, generator=g), torch.randn(30, 16, generator=g)
    y = torch.randint(0, 30, (7,), generator=g)
    y[2] = -100
    return h, w, y


def test_logit_capture_numpy_scalars_equal_python_numbers():
    h, w, y = _capture_inputs()
    py = logit_capture(h, w, y, topk=3, softcap=4.0, label_smoothing=0.1, z_loss=1e-3, ignore_index=-100,
                       num_items_in_batch=5, impl="torch")  # fmt: skip
    npy = logit_capture(h, w, y, topk=np.int64(3), softcap=np.float32(4.0), label_smoothing=np.float64(0.1),
                        z_loss=np.float32(1e-3), ignore_index=np.int32(-100), num_items_in_batch=np.int64(5),
                        impl="torch")  # fmt: skip
    for a, b in zip(py, npy):
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_other_ops_take_numpy_scalars():
    h, w, y = _capture_inputs()
    cap = logit_capture(h, w, y, torch.randn(30, 9), impl="torch")
    g, b_w, bias = torch.randn(7, 4), torch.randn(30, 4), torch.randn(30)
    torch.testing.assert_close(copilot_error_loss(g, b_w, bias, cap, y, ignore_index=np.int64(-100)),
                               copilot_error_loss(g, b_w, bias, cap, y))  # fmt: skip
    q, k = torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)
    pos = torch.arange(5)[None]
    torch.testing.assert_close(log_attention(q, k, k, q_pos=pos, k_pos=pos, scale=np.float32(0.5)),
                               log_attention(q, k, k, q_pos=pos, k_pos=pos, scale=0.5))  # fmt: skip
    z, f = torch.randn(3, 20), 0.05 * torch.randn(3, 20)
    kw = dict(lam=np.float32(0.5), temperature=np.float64(0.8), top_k=np.int64(5), top_p=np.float32(0.9))
    got = rectified_next_token(z, f, generator=torch.Generator().manual_seed(1), **kw)
    want = rectified_next_token(z, f, generator=torch.Generator().manual_seed(1), lam=0.5, temperature=0.8,
                                top_k=5, top_p=float(np.float32(0.9)))  # fmt: skip
    assert torch.equal(got, want)


@pytest.mark.parametrize(
    ("call", "name"),
    [
        (lambda h, w, y: logit_capture(h, w, y, ignore_index=2**70), "ignore_index"),
        (lambda h, w, y: logit_capture(h, w, y, topk=np.bool_(True)), "topk"),
        (lambda h, w, y: logit_capture(h, w, y, softcap=1e300), "softcap"),  # fp32 logits: cap would be inf
        (lambda h, w, y: logit_capture(h, w, y, label_smoothing=10**400), "label_smoothing"),
        (lambda h, w, y: logit_capture(h, w, y, num_items_in_batch=10**400), "num_items_in_batch"),
    ],
    ids=["ignore_index-past-int64", "topk-numpy-bool", "softcap-past-fp32", "smoothing-past-float",
         "num-items-past-float"],  # fmt: skip
)
def test_logit_capture_rejects_unrepresentable_options(call, name):
    h, w, y = _capture_inputs()
    with pytest.raises(ValueError, match=name):
        call(h, w, y)


def test_fp64_capture_keeps_caps_beyond_fp32():
    # fp64 inputs compute in fp64: a cap past the fp32 range is legal there (and changes nothing visible).
    h, w, y = _capture_inputs()
    cap = logit_capture(h.double(), w.double(), y, softcap=1e300, impl="torch")
    assert torch.isfinite(cap.loss)


def test_log_attention_scale_and_copilot_loss_ignore_index_ranges():
    q = torch.randn(1, 1, 3, 8)
    pos = torch.arange(3)[None]
    with pytest.raises(ValueError, match="scale: expected a number representable in float32"):
        log_attention(q, q, q, q_pos=pos, k_pos=pos, scale=1e300)
    assert torch.isfinite(log_attention(q.double(), q.double(), q.double(), q_pos=pos, k_pos=pos, scale=1e300)).all()
    h, w, y = _capture_inputs()
    cap = logit_capture(h, w, y, torch.randn(30, 9), impl="torch")
    with pytest.raises(ValueError, match="ignore_index"):
        copilot_error_loss(torch.randn(7, 4), torch.randn(30, 4), torch.randn(30), cap, y, ignore_index=2**64)
