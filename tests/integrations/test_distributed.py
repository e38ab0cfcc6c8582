"""2-process DDP (CPU, gloo) with CopilotTrainer equals the single-process run.

Each rank takes 4 rows per step (8 in all). The Pilot's loss is a token mean over the whole step (all
ranks' tokens, via ``num_items_in_batch``), so its loss and gradients equal one process on the concatenated
8 rows. The Copilot's token RMSE is not additive: DDP averages the two ranks' RMSEs, which is what one
process computes with the 8 rows split into 2 accumulation micro-batches (as our own loop and the stock
Trainer do for a non-additive loss). So the reference is one process with ``per_device_train_batch_size=4``
and ``gradient_accumulation_steps=2`` (same rows, same order), and the Pilot alone is also checked against
one process on the concatenated batch with no accumulation.
"""

from __future__ import annotations

import socket

import pytest
import torch

pytest.importorskip("accelerate")

import torch.multiprocessing as mp  # noqa: E402
from integ_helpers import collate_fn, ddp_worker, examples, hf_args, train_logs  # noqa: E402

from tcopilot.integrations import CopilotTrainer, load_checkpoint  # noqa: E402
from tcopilot.testing import tiny_pair  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _single(tmp_path, name, batch, accum, copilot=True):
    model = tiny_pair("llama")
    args = hf_args(tmp_path / name, max_steps=2, per_device_train_batch_size=batch,
                   gradient_accumulation_steps=accum)
    tr = CopilotTrainer(model=model, args=args, train_dataset=examples(), data_collator=collate_fn,
                        copilot_learning_rate=1e-3)
    tr.train()
    return model, train_logs(tr)


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_ddp_two_processes_equal_single_process(tmp_path):
    out = tmp_path / "ddp"
    out.mkdir()
    mp.spawn(ddp_worker, args=(2, _free_port(), str(out)), nprocs=2, join=True)
    ddp = torch.load(out / "ddp.pt", weights_only=False)
    assert ddp["world"] == 2

    ref_model, ref_logs = _single(tmp_path, "accum", batch=4, accum=2)
    assert len(ddp["logs"]) == len(ref_logs) == 2
    for a, b in zip(ddp["logs"], ref_logs):
        for key in ("pilot_loss", "copilot_loss", "grad_norm_pilot", "grad_norm_copilot"):
            assert a[key] == pytest.approx(b[key], rel=1e-5), key
    for name, p in ref_model.state_dict().items():
        torch.testing.assert_close(ddp["state"][name], p, rtol=1e-4, atol=1e-6, msg=name)

    # the Pilot's loss and gradient norm also equal one process on the concatenated batch, no accumulation
    _, concat_logs = _single(tmp_path, "concat", batch=8, accum=1)
    for a, b in zip(ddp["logs"], concat_logs):
        assert a["pilot_loss"] == pytest.approx(b["pilot_loss"], rel=1e-5)
        assert a["grad_norm_pilot"] == pytest.approx(b["grad_norm_pilot"], rel=1e-4)

    # the checkpoint written by rank 0 of the 2-process run loads in one process
    fresh = tiny_pair("llama", seed=9)
    load_checkpoint(fresh, str(out / "checkpoint-2"))
    for name, p in fresh.state_dict().items():
        torch.testing.assert_close(p, ddp["state"][name], rtol=0, atol=0, msg=name)
