"""FSDP2 (``torch.distributed.fsdp.fully_shard``) on 2 CPU processes (gloo) equals the single-process step.

Sharding plan (the one the README documents): each decoder layer of the Pilot and of the Copilot is its own
FSDP unit and the ``TransformerCopilot`` is the root. The root's pre-forward hook all-gathers every parameter
left to it (embeddings, final norms, ``lm_head``, the Copilot's ``error_in`` / ``error_out``), so the fused
ops, which read ``lm_head.weight`` and the Copilot's head weights directly instead of calling those modules,
get plain full tensors (``logit_capture`` refuses a ``DTensor``; checked below).

Each rank takes 4 of the 8 rows. The Pilot's loss is a share of the whole batch's token mean
(``num_items_in_batch`` = tokens of all 8 rows) and FSDP2 averages gradients over ranks, so each rank
backpropagates ``world * pilot_loss``: the Pilot's summed loss and its gradients equal one process on the
concatenated 8 rows. The Copilot's token RMSE is not additive, so its reference is one process with the 8
rows in 2 accumulation micro-batches (each RMSE / 2), as in our own loop and in ``test_distributed.py``.
After per-model clipping and an SGD step, the gathered (``full_state_dict``) weights are saved with
:func:`tcopilot.integrations.save_checkpoint` on rank 0 and loaded by one process into a fresh, unsharded model.
"""

from __future__ import annotations

import os
import socket

import pytest
import torch

pytest.importorskip("accelerate")  # tcopilot.integrations.trainer imports transformers.Trainer
fsdp = pytest.importorskip("torch.distributed.fsdp")
if not torch.distributed.is_available() or not hasattr(fsdp, "fully_shard"):
    pytest.skip("torch.distributed.fsdp.fully_shard (FSDP2, torch >= 2.6) is not available", allow_module_level=True)

import torch.multiprocessing as mp  # noqa: E402
from integ_helpers import collate_fn, examples  # noqa: E402

from tcopilot.integrations import load_checkpoint  # noqa: E402
from tcopilot.pilot import find_decoder_layers  # noqa: E402
from tcopilot.testing import tiny_pair  # noqa: E402

WORLD, ROWS, LR, CLIP_PILOT, CLIP_COPILOT = 2, 8, 0.5, 1.0, 0.05


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _batch() -> tuple[dict, int]:
    """8 rows of 10..12 tokens (right padding) with prompts of different lengths; the counted tokens."""
    rows = [{k: v[: 12 - i % 3] for k, v in r.items()} for i, r in enumerate(examples(ROWS))]
    batch = collate_fn(rows)
    return batch, int((batch["labels"][:, 1:] != -100).sum())


def _rows(batch: dict, part: int, parts: int) -> dict:
    n = ROWS // parts
    return {k: v[part * n:(part + 1) * n] for k, v in batch.items()}


def _clip_and_norms(model) -> dict:
    """Per-model clipping as in our loop and CopilotTrainer; the norms before clipping."""
    norms = {}
    for name, module, limit in (("pilot", model.pilot, CLIP_PILOT), ("copilot", model.copilot, CLIP_COPILOT)):
        norm = torch.nn.utils.clip_grad_norm_([p for p in module.parameters() if p.grad is not None], limit)
        norms[name] = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
    return norms


def shard(model, mesh) -> None:
    """The documented FSDP2 plan: one unit per decoder layer (Pilot and Copilot), the TransformerCopilot as root."""
    from torch.distributed.fsdp import fully_shard

    for layer in find_decoder_layers(model.pilot):
        fully_shard(layer, mesh=mesh)
    for layer in model.copilot.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)


def fsdp_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    from tcopilot import logit_capture
    from tcopilot.integrations import save_checkpoint

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        mesh = init_device_mesh("cpu", (world,))
        model = tiny_pair("llama").train()
        shard(model, mesh)
        head = model.pilot.get_output_embeddings().weight
        assert isinstance(head, DTensor), type(head)  # sharded between forwards ...
        try:  # ... which the fused op refuses with a message saying what to do
            logit_capture(torch.zeros(2, head.shape[1]), head, torch.zeros(2, dtype=torch.long), impl="torch")
            refused = ""
        except ValueError as err:
            refused = str(err)

        batch, n_items = _batch()
        part = _rows(batch, rank, world)
        out = model(part["input_ids"], attention_mask=part["attention_mask"], labels=part["labels"],
                    num_items_in_batch=n_items)
        # FSDP2 averages gradients over ranks: scale the Pilot's share back to the global token sum / count.
        (out.pilot_loss * world + out.copilot_loss).backward()
        losses = torch.stack([out.pilot_loss.detach(), out.copilot_loss.detach() / world])
        dist.all_reduce(losses)  # the Pilot's token mean over all 8 rows; the mean of the ranks' RMSEs
        grads = {n: p.grad.full_tensor() for n, p in model.named_parameters()}
        norms = _clip_and_norms(model)
        torch.optim.SGD(model.parameters(), lr=LR).step()
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        wrong = {}  # plans that leave a weight the fused ops read sharded: a clear ValueError on every rank
        for plan in ("lm_head", "copilot"):
            other = tiny_pair("llama").train()
            for unit in [*find_decoder_layers(other.pilot), *other.copilot.layers,
                         other.pilot.lm_head if plan == "lm_head" else other.copilot, other]:
                fully_shard(unit, mesh=mesh)
            try:
                other(part["input_ids"], attention_mask=part["attention_mask"], labels=part["labels"])
                wrong[plan] = ""
            except ValueError as err:
                wrong[plan] = str(err)
        if rank == 0:
            save_checkpoint(model, os.path.join(out_dir, "checkpoint"), state_dict=full)
            torch.save({"losses": losses, "grads": grads, "norms": norms, "state": full, "refused": refused,
                        "wrong": wrong,
                        "sharded": sorted(n for n, p in model.named_parameters() if isinstance(p, DTensor))},
                       os.path.join(out_dir, "fsdp.pt"))
        else:
            assert full == {}, "cpu_offload=True: only rank 0 holds the full state dict"
    finally:
        dist.destroy_process_group()


def _single(accum: int) -> dict:
    """One process: the 8 rows in ``accum`` micro-batches (Copilot RMSE / accum), clipping, one SGD step."""
    model = tiny_pair("llama").train()
    batch, n_items = _batch()
    pilot_loss = copilot_loss = 0.0
    for k in range(accum):
        part = _rows(batch, k, accum)
        out = model(part["input_ids"], attention_mask=part["attention_mask"], labels=part["labels"],
                    num_items_in_batch=n_items)
        (out.pilot_loss + out.copilot_loss / accum).backward()
        pilot_loss += float(out.pilot_loss.detach())
        copilot_loss += float(out.copilot_loss.detach()) / accum
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    norms = _clip_and_norms(model)
    torch.optim.SGD(model.parameters(), lr=LR).step()
    return {"losses": (pilot_loss, copilot_loss), "grads": grads, "norms": norms,
            "state": {k: v.detach().clone() for k, v in model.state_dict().items()}}


def test_fsdp2_two_processes_equal_single_process(tmp_path):
    mp.spawn(fsdp_worker, args=(WORLD, _free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    got = torch.load(tmp_path / "fsdp.pt", weights_only=False)

    # every parameter was sharded (DTensor) outside forward; logit_capture refuses a shard with a clear error
    names = [n for n, _ in tiny_pair("llama").named_parameters()]
    assert got["sharded"] == sorted(names)
    assert "DTensor" in got["refused"] and "full_tensor()" in got["refused"]
    assert got["wrong"]["lm_head"].startswith("the Pilot's LM head weight: sharded (a DTensor)")
    assert got["wrong"]["copilot"].startswith("copilot.error_in.weight: sharded (a DTensor)")
    assert all("then on the TransformerCopilot itself" in msg for msg in got["wrong"].values())

    ref = _single(accum=WORLD)  # same rows, same order, Copilot RMSE averaged over the 2 halves
    assert float(got["losses"][0]) == pytest.approx(ref["losses"][0], rel=1e-6)
    assert float(got["losses"][1]) == pytest.approx(ref["losses"][1], rel=1e-6)
    for key in ("pilot", "copilot"):
        assert got["norms"][key] == pytest.approx(ref["norms"][key], rel=1e-5), key
    assert ref["norms"]["copilot"] > CLIP_COPILOT  # the clipping really acted
    assert set(got["grads"]) == set(ref["grads"]) == set(names)
    for name, g in ref["grads"].items():
        torch.testing.assert_close(got["grads"][name], g, rtol=1e-4, atol=1e-7, msg=name)
    assert set(got["state"]) == set(ref["state"])
    for name, p in ref["state"].items():
        torch.testing.assert_close(got["state"][name], p, rtol=1e-5, atol=1e-7, msg=name)

    # the Pilot alone also equals one process on the concatenated batch, no accumulation
    concat = _single(accum=1)
    assert float(got["losses"][0]) == pytest.approx(concat["losses"][0], rel=1e-6)
    for name, g in concat["grads"].items():
        if name.startswith("pilot."):
            torch.testing.assert_close(got["grads"][name], g, rtol=1e-4, atol=1e-7, msg=name)

    # the gathered checkpoint loads into a fresh, unsharded model with identical weights
    fresh = tiny_pair("llama", seed=9)
    load_checkpoint(fresh, str(tmp_path / "checkpoint"))
    assert (tmp_path / "checkpoint" / "copilot" / "model.safetensors").exists()
    for name, p in fresh.state_dict().items():
        torch.testing.assert_close(p, got["state"][name], rtol=0, atol=0, msg=name)
