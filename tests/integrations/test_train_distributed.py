"""Our own loop (:class:`tcopilot.train.Trainer`) on 2 CPU processes (gloo), DDP and FSDP2, against one process.

Setup: a global batch of 8 rows, 2 ranks, ``grad_accum=g`` per rank. Each rank takes its contiguous 4 rows of
the global batch and splits them into ``g`` micro-batches, so the micro-batches are those of one process with
``grad_accum = 2 * g``. The Pilot's loss is a token mean over the global batch either way; the Copilot's token
RMSE is not additive over rows, and both runs average it over the same ``2 * g`` micro-batches, so the single
process with ``grad_accum = 2 * g`` is the exact reference (same rows, same padding, same micro-batches).

One ``mp.spawn`` runs every distributed phase (spawning costs more than the steps):

1. DDP, ``g=1``: 2 of 4 steps, checkpoint at step 2 (compared with the reference's step 2; resumed by one process).
2. DDP, ``g=1``: resumes the reference's (single-process) ``checkpoint-2`` and finishes the 4 steps.
3. DDP, ``g=2`` (``no_sync`` on the first micro-batch): the step's gradients and logged values against one
   process with ``grad_accum=4``. Gradients, not weights after AdamW: the 4 micro-batch gradients are summed in
   another order ((g0 + g1) + (g2 + g3) against ((g0 + g1) + g2) + g3), and AdamW's first update
   ``g / (|g| + eps)`` turns that last-bit difference into a visible one for entries with ``|g| ~ eps``. With
   ``g=1`` both sums have two terms and the runs agree to rounding, steps included.
4. FSDP2, ``g=1``: 2 of 4 steps, checkpoint at step 2 (gathered weights and Adam moments; resumed by one process).
5. FSDP2, ``g=1``: resumes the reference's ``checkpoint-2`` (every rank keeps its shard) and finishes.
6. FSDP2, ``g=2`` (gradient sync off for the first micro-batch): as 3, the gathered gradients.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time

import pytest
import torch

if not torch.distributed.is_available():
    pytest.skip("torch.distributed is not available", allow_module_level=True)

import torch.multiprocessing as mp  # noqa: E402
from integ_helpers import examples  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from tcopilot.testing import tiny_pair  # noqa: E402
from tcopilot.train import TrainConfig, Trainer  # noqa: E402

WORLD = 2
LOGGED = ("pilot_loss", "copilot_loss", "grad_norm_pilot", "grad_norm_copilot", "error_mass", "topk_residual")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cfg(**kw) -> TrainConfig:
    base = dict(steps=4, batch_size=8, grad_accum=1, lr_pilot=3e-3, lr_copilot=3e-3, warmup_steps=1,
                clip_pilot=1.0, clip_copilot=0.05, log_every=1, ckpt_every=2, keep_checkpoints=5, seed=0,
                keep_log=True, log_steps=2, log_topk=4, log_pooled_dtype="int8")
    base.update(kw)
    return TrainConfig(**base)


def _trainer(run_dir, **kw) -> Trainer:
    return Trainer(tiny_pair("llama"), examples(16), _cfg(**kw), str(run_dir), progress=False)


def _state(trainer: Trainer) -> dict:
    return {k: v.detach().clone() for k, v in trainer.full_state_dict().items()}


def _metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]


def worker(rank: int, world: int, port: int, root: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    out = {}
    try:
        # the Trainer initialises the process group itself from the torchrun-style variables
        tr = _trainer(os.path.join(root, "ddp"))
        assert (tr.rank, tr.world) == (rank, world) and tr._ddp is not None
        tr.train(stop_after=2)
        out["ddp"] = _state(tr)

        tr = _trainer(os.path.join(root, "ddp_resume"))
        tr.train()
        out["ddp_resume"] = _state(tr)

        tr = _trainer(os.path.join(root, "ddp_accum"), grad_accum=2, ckpt_every=0)
        out["ddp_accum"] = tr.accumulate_gradients()
        out["ddp_accum_grads"] = {n: p.grad.clone() for n, p in tr.model.named_parameters()}

        tr = _trainer(os.path.join(root, "fsdp"), distributed="fsdp2")
        assert tr._ddp is None and type(next(tr.model.parameters())).__name__ == "DTensor"
        tr.train(stop_after=2)
        out["fsdp"] = _state(tr)

        tr = _trainer(os.path.join(root, "fsdp_resume"), distributed="fsdp2")
        tr.train()
        out["fsdp_resume"] = _state(tr)

        tr = _trainer(os.path.join(root, "fsdp_accum"), distributed="fsdp2", grad_accum=2, ckpt_every=0)
        synced = []  # per micro-batch: the reduce-scatter flags of every FSDP2 unit (set before its forward)
        tr.model.register_forward_pre_hook(lambda m, args: synced.append(sorted(
            {g.reduce_grads for u in m.modules() if hasattr(u, "_get_fsdp_state")
             for g in u._get_fsdp_state()._fsdp_param_groups})))
        out["fsdp_accum"] = tr.accumulate_gradients()
        out["fsdp_accum_grads"] = {n: p.grad.full_tensor() for n, p in tr.model.named_parameters()}
        out["fsdp_accum_synced"] = synced
        if rank == 0:
            torch.save(out, os.path.join(root, "states.pt"))
        else:
            assert out["fsdp"] == {}  # FSDP2: only rank 0 keeps the gathered state
    finally:
        dist.destroy_process_group()


def _close(got: dict, ref: dict, rtol=1e-5, atol=1e-7) -> None:
    assert set(got) == set(ref)
    for name, p in ref.items():
        torch.testing.assert_close(got[name], p, rtol=rtol, atol=atol, msg=name)


def _ckpt_weights(path) -> dict:
    return {f"{part}.{k}": v for part in ("pilot", "copilot") for k, v in
            load_file(os.path.join(path, f"{part}.safetensors")).items()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_dist")
    t0 = time.perf_counter()
    ref = _trainer(root / "ref", grad_accum=WORLD)  # the exact reference: 2 micro-batches of 4 rows
    ref.train()
    ref4 = _state(ref)
    accum = _trainer(root / "ref_accum", grad_accum=2 * WORLD, ckpt_every=0)
    accum_rec = accum.accumulate_gradients()
    accum_grads = {n: p.grad.clone() for n, p in accum.model.named_parameters()}
    for name in ("ddp_resume", "fsdp_resume"):  # a single-process checkpoint, resumed by 2 processes
        os.makedirs(root / name)
        shutil.copytree(root / "ref" / "checkpoint-2", root / name / "checkpoint-2")
    t1 = time.perf_counter()
    mp.spawn(worker, args=(WORLD, _free_port(), str(root)), nprocs=WORLD, join=True)
    t2 = time.perf_counter()
    print(f"single-process references {t1 - t0:.1f} s, 2-process phases {t2 - t1:.1f} s")
    return {"root": root, "ref4": ref4, "accum": (accum_rec, accum_grads),
            "states": torch.load(root / "states.pt", weights_only=False)}


def test_ddp_steps_equal_single_process(runs):
    root, states = runs["root"], runs["states"]
    ref = _metrics(root / "ref")[:2]
    got = _metrics(root / "ddp")
    assert [r["step"] for r in got] == [1, 2]  # rank 0 alone writes metrics.jsonl
    for a, b in zip(got, ref):
        assert a["tokens"] == b["tokens"]
        for key in LOGGED:
            assert a[key] == pytest.approx(b[key], rel=1e-5), key
    assert ref[0]["grad_norm_copilot"] > 0.05  # the Copilot's clipping acted
    _close(_ckpt_weights(root / "ddp" / "checkpoint-2"), _ckpt_weights(root / "ref" / "checkpoint-2"))
    _close(states["ddp"], _ckpt_weights(root / "ref" / "checkpoint-2"))
    # grad_accum=2 on each rank (no_sync on the first micro-batch) = one process with 4 micro-batches
    rec, grads = runs["accum"]
    assert states["ddp_accum"]["tokens"] == rec["tokens"]
    for key in ("pilot_loss", "copilot_loss", "error_mass", "topk_residual"):
        assert states["ddp_accum"][key] == pytest.approx(rec[key], rel=1e-6), key
    _close(states["ddp_accum_grads"], grads, rtol=1e-5, atol=1e-8)


def test_ddp_checkpoint_resumes_across_world_sizes(runs, tmp_path):
    root = runs["root"]
    # same files as one process's checkpoint
    for name in ("pilot.safetensors", "copilot.safetensors", "optimizer.pt", "state.json", "mistake_log"):
        assert (root / "ddp" / "checkpoint-2" / name).exists(), name
    # written by 2 processes, resumed by 1: continues like the uninterrupted single-process run
    shutil.copytree(root / "ddp" / "checkpoint-2", tmp_path / "checkpoint-2")
    tr = Trainer(tiny_pair("llama", seed=5), examples(16), _cfg(grad_accum=WORLD), str(tmp_path), progress=False)
    tr.train()
    assert tr.step == 4
    _close(_state(tr), runs["ref4"])
    # written by 1 process, resumed by 2
    _close(runs["states"]["ddp_resume"], runs["ref4"])


def test_fsdp2_steps_and_checkpoints(runs, tmp_path):
    root, states = runs["root"], runs["states"]
    for a, b in zip(_metrics(root / "fsdp"), _metrics(root / "ref")[:2]):
        for key in LOGGED:
            assert a[key] == pytest.approx(b[key], rel=1e-5), key
    ckpt = root / "fsdp" / "checkpoint-2"
    _close(_ckpt_weights(ckpt), _ckpt_weights(root / "ref" / "checkpoint-2"))
    _close(states["fsdp"], states["ddp"])
    # the Adam moments were gathered into the single-process (index-keyed) layout
    got = torch.load(ckpt / "optimizer.pt", weights_only=False)
    ref = torch.load(root / "ref" / "checkpoint-2" / "optimizer.pt", weights_only=False)
    for part in ("pilot", "copilot"):
        assert got[part]["param_groups"] == ref[part]["param_groups"]
        assert set(got[part]["state"]) == set(ref[part]["state"])
        for i, row in ref[part]["state"].items():
            for k, v in row.items():
                torch.testing.assert_close(got[part]["state"][i][k], v, rtol=1e-5, atol=1e-9)
    # FSDP2 checkpoint resumed by one process; a single-process checkpoint resumed by FSDP2
    shutil.copytree(ckpt, tmp_path / "checkpoint-2")
    tr = Trainer(tiny_pair("llama", seed=5), examples(16), _cfg(grad_accum=WORLD), str(tmp_path), progress=False)
    tr.train()
    _close(_state(tr), runs["ref4"])
    _close(states["fsdp_resume"], runs["ref4"])
    # grad_accum=2 on each rank, reduce-scatter after the second micro-batch only = one process with 4
    rec, grads = runs["accum"]
    assert states["fsdp_accum_synced"] == [[False], [True]]
    for key in ("pilot_loss", "copilot_loss", "error_mass", "topk_residual"):
        assert states["fsdp_accum"][key] == pytest.approx(rec[key], rel=1e-6), key
    _close(states["fsdp_accum_grads"], grads, rtol=1e-5, atol=1e-8)


CLI_ARGS = ["--steps", "2", "--batch-size", "8", "--n-train", "32", "--n-test", "4", "--pilot-layers", "1",
            "--pilot-hidden", "32", "--copilot-layers", "1", "--quiet"]
CLI_FILES = ("pilot_only/pilot/model.safetensors", "joint/pilot/model.safetensors", "joint/copilot/model.safetensors",
             "joint/checkpoint-2/pilot.safetensors", "joint/checkpoint-2/copilot.safetensors")


def _torchrun(run_dir, *extra) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(_free_port()), "-m", "tcopilot", "train", "--run-dir", str(run_dir), *CLI_ARGS, *extra]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def cli_single(tmp_path_factory):
    """``tcopilot train --grad-accum 2`` in this process: the 2-process run's exact reference."""
    from tcopilot.cli import main

    run = tmp_path_factory.mktemp("cli_single") / "run"
    assert main(["train", "--run-dir", str(run), *CLI_ARGS, "--grad-accum", "2"]) == 0
    return run


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_torchrun_cli_smoke(tmp_path, mode, cli_single):
    run = tmp_path / "run"
    proc = _torchrun(run, "--distributed", mode)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("# tcopilot main job") == 1  # rank 0 alone prints the report
    assert (run / "report.md").exists() and (run / "joint" / "checkpoint-2" / "state.json").exists()
    assert [json.loads(x)["step"] for x in open(run / "joint" / "metrics.jsonl")] == [2]
    assert json.load(open(run / "config.json"))["train"]["distributed"] == mode
    for name in CLI_FILES:  # same files and weights (tied embeddings stored once) as one process
        _close(load_file(run / name), load_file(cli_single / name), rtol=1e-5, atol=1e-7)


def test_distributed_config_errors(tmp_path):
    with pytest.raises(ValueError, match="distributed: expected one of"):
        _cfg(distributed="fsdp").validate()
    # one process: the setting is ignored and nothing is wrapped
    tr = _trainer(tmp_path, distributed="fsdp2")
    assert (tr.rank, tr.world, tr._ddp) == (0, 1, None)
