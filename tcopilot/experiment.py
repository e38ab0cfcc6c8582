"""The main job: a tiny Pilot with and without a Copilot on generated arithmetic, trained and compared.

``tcopilot train`` (no arguments) runs :func:`run_experiment` with :class:`ExperimentConfig`'s defaults:
it trains a small Llama-style Pilot alone and a Pilot + Copilot pair with the same seed, steps and data
order, evaluates exact-match accuracy on held-out problem templates, and writes ``report.md`` with the
accuracies (Pilot alone; Pilot + Copilot with both fusions at two lambdas), the training time per step
and the decode throughput of both.

Run layout::

    RUN_DIR/config.json, tokenizer.json, report.md, results.json
    RUN_DIR/pilot_only/{metrics.jsonl, checkpoint-*/, pilot/, mistake_log/}
    RUN_DIR/joint/{metrics.jsonl, checkpoint-*/, pilot/, copilot/, mistake_log/}

Under ``torchrun --nproc_per_node N -m tcopilot train ...`` every rank builds the same data, tokenizer and
models and trains its share of each global batch (:mod:`tcopilot.train`, DDP or FSDP2); rank 0 alone writes
the files and evaluates, the other ranks return an empty report.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field

import torch

from tcopilot.copilot import Copilot, param_count
from tcopilot.data.arithmetic import generate_arithmetic
from tcopilot.data.prompts import encode_example, format_prompt
from tcopilot.data.tokenizer import WordTokenizer
from tcopilot.evaluate import evaluate_accuracy
from tcopilot.pilot import TransformerCopilot
from tcopilot.train import TrainConfig, Trainer, barrier, dist_info


@dataclass
class ExperimentConfig:
    run_dir: str = "runs/default"
    seed: int = 0
    n_train: int = 4000
    n_test: int = 300
    style: str = "short"
    max_length: int = 96
    pilot_hidden: int = 128
    pilot_layers: int = 4
    pilot_heads: int = 4
    copilot_layers: int = 2
    max_new_tokens: int = 40
    eval_batch_size: int = 100
    eval_cuda_graph: bool = False  # decode the evaluation with one tcopilot.GraphDecoder per setting (CUDA only)
    eval_num_beams: int = 1  # 1: greedy evaluation; > 1: beam search (the paper evaluates with 4 beams)
    lams: tuple = (0.5, 1.0)
    device: str = "auto"  # "auto" (CUDA when present), "cpu" or "cuda"; see resolve_device
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(
            steps=300, batch_size=32, lr_pilot=2e-3, lr_copilot=2e-3, warmup_steps=30, ckpt_every=100, log_every=10,
            # A small Mistake Log for `tcopilot inspect` (~0.25 MB a step, last 8 steps kept; the per-step
            # history and confusion counts cover the whole run).
            keep_log=True, log_steps=8, log_topk=8, log_pooled_dtype="int8",
        )
    )


DEVICES = ("auto", "cpu", "cuda")


def resolve_device(name: str) -> torch.device:
    """The device a run trains and evaluates on: ``"auto"`` is CUDA when present, else the CPU.

    Under torchrun each process takes ``cuda:LOCAL_RANK`` (what ``init_distributed`` made current).
    """
    if name not in DEVICES:
        raise ValueError(f"device: expected one of {DEVICES}, got {name!r}")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError("device: expected 'cpu' or 'auto' on a machine without CUDA, got 'cuda'")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))


def build_pilot(vocab_size: int, cfg: ExperimentConfig, pad_token_id: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    pcfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=cfg.pilot_hidden,
        intermediate_size=cfg.pilot_hidden * 3,
        num_hidden_layers=cfg.pilot_layers,
        num_attention_heads=cfg.pilot_heads,
        num_key_value_heads=cfg.pilot_heads,
        max_position_embeddings=max(256, cfg.max_length + cfg.max_new_tokens + 8),
        tie_word_embeddings=True,
        pad_token_id=pad_token_id,
        attn_implementation="sdpa",
    )
    return LlamaForCausalLM(pcfg)


def _gathered(state: dict | None, prefix: str) -> dict:
    """``save_pretrained`` keywords: the gathered (FSDP2) state of one model, or none (use the module's own)."""
    if state is None:
        return {}
    return {"state_dict": {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}}


def _load_or_train(name: str, cfg: ExperimentConfig, tok, examples, with_copilot: bool, progress: bool):
    """Train one model pair (resuming an interrupted run); returns (model, mean step time or None)."""
    out_dir = os.path.join(cfg.run_dir, name)
    pilot_dir = os.path.join(out_dir, "pilot")
    device = resolve_device(cfg.device)
    rank, world = dist_info()
    done = os.path.exists(os.path.join(pilot_dir, "config.json"))
    barrier()  # several processes: every rank has looked before rank 0 writes
    if done:
        return load_run_model(out_dir, device), None
    torch.manual_seed(cfg.seed)
    pilot = build_pilot(tok.vocab_size, cfg, tok.pad_token_id)
    copilot = Copilot.from_pilot(pilot, num_hidden_layers=cfg.copilot_layers) if with_copilot else None
    model = TransformerCopilot(pilot, copilot).to(device)
    trainer = Trainer(model, examples, cfg.train, out_dir, pad_token_id=tok.pad_token_id, progress=progress)
    trainer.train()
    if world == 1:
        pilot.save_pretrained(pilot_dir)
        if copilot is not None:
            copilot.save_pretrained(os.path.join(out_dir, "copilot"))
    else:
        sharded = cfg.train.distributed == "fsdp2"
        state = trainer.full_state_dict() if sharded else None  # FSDP2: gathered on every rank, kept on rank 0
        if rank == 0:
            pilot.save_pretrained(pilot_dir, **_gathered(state, "pilot."))
            if copilot is not None:
                copilot.save_pretrained(os.path.join(out_dir, "copilot"), **_gathered(state, "copilot."))
        barrier()
        if sharded and rank == 0:  # evaluate an unsharded copy
            model = load_run_model(out_dir, device)
    times = trainer.step_times[3:] or trainer.step_times
    return model, (statistics.median(times) if times else None)


def load_run_model(model_dir: str, device: str | torch.device = "cpu") -> TransformerCopilot:
    """Load ``pilot/`` (and ``copilot/`` when present) of a finished run directory onto ``device``."""
    from transformers import AutoModelForCausalLM

    pilot = AutoModelForCausalLM.from_pretrained(os.path.join(model_dir, "pilot"))
    cdir = os.path.join(model_dir, "copilot")
    copilot = Copilot.from_pretrained(cdir) if os.path.isdir(cdir) else None
    if not isinstance(device, torch.device):
        device = resolve_device(device) if device in DEVICES else torch.device(device)
    return TransformerCopilot(pilot, copilot).to(device)


def evaluation_grid(cfg: ExperimentConfig, pilot_only, joint, tok, test, progress: bool) -> list[dict]:
    kw = dict(style=cfg.style, batch_size=cfg.eval_batch_size, max_new_tokens=cfg.max_new_tokens, progress=progress,
              cuda_graph=cfg.eval_cuda_graph, num_beams=cfg.eval_num_beams)  # fmt: skip
    rows = [
        {
            "system": "Pilot alone (trained without Copilot)",
            "fusion": "-",
            "lam": 0.0,
            **evaluate_accuracy(pilot_only, tok, test, lam=0.0, desc="pilot-only", **kw),
        }
    ]
    rows.append(
        {
            "system": "Pilot of the joint run, Copilot off",
            "fusion": "-",
            "lam": 0.0,
            **evaluate_accuracy(joint, tok, test, lam=0.0, desc="joint lam=0", **kw),
        }
    )
    for fusion in ("probs", "logits"):
        for lam in cfg.lams:
            rows.append(
                {
                    "system": "Pilot + Copilot",
                    "fusion": fusion,
                    "lam": lam,
                    **evaluate_accuracy(joint, tok, test, lam=lam, fusion=fusion, desc=f"{fusion} lam={lam}", **kw),
                }
            )
    return rows


def sign_test(a: list[bool], b: list[bool]) -> tuple[int, int, float]:
    """Exact two-sided sign test on paired correctness: (b right & a wrong, a right & b wrong, p-value)."""
    from math import comb

    up = sum(1 for x, y in zip(a, b) if y and not x)
    down = sum(1 for x, y in zip(a, b) if x and not y)
    n = up + down
    if n == 0:
        return 0, 0, 1.0
    k = min(up, down)
    p = min(1.0, 2 * sum(comb(n, i) for i in range(k + 1)) / 2**n)
    return up, down, p


def write_report(cfg: ExperimentConfig, rows, times, sizes, wall: float) -> str:
    base = rows[0]
    device = resolve_device(cfg.device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    lines = [
        "# tcopilot main job: tiny Pilot with and without a Copilot",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, "
        f"torch {torch.__version__}, device {where}. "
        f"Wall time of the whole job: {wall:.0f} s.",
        "",
        f"Task: generated arithmetic word problems (train {cfg.n_train} items from the train templates, "
        f"test {cfg.n_test} items from held-out templates), exact match of the final number, "
        + ("greedy decoding." if cfg.eval_num_beams == 1 else f"beam search with {cfg.eval_num_beams} beams."),
        f"Pilot: Llama-style, {cfg.pilot_layers} layers, width {cfg.pilot_hidden}, {sizes['pilot']:,} parameters. "
        f"Copilot: {cfg.copilot_layers} layers, width {cfg.pilot_hidden}, {sizes['copilot']:,} parameters. "
        f"{cfg.train.steps} steps of batch {cfg.train.batch_size}, seed {cfg.seed}, same data order for both runs.",
        "",
        "| system | fusion | lambda | accuracy | vs Pilot alone (gained / lost, sign-test p) | decode tokens/s |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        up, down, p = sign_test(base["correct"], r["correct"])
        cmp = "-" if r is base else f"+{up} / -{down}, p={p:.3f}"
        lines.append(
            f"| {r['system']} | {r['fusion']} | {r['lam']} | {100 * r['accuracy']:.1f}% | {cmp} | "
            f"{r['tokens_per_s']:.0f} |"
        )
    lines += [
        "",
        "| training | median time per step |",
        "|---|---|",
        f"| Pilot alone | {times['pilot_only'] * 1000:.0f} ms |"
        if times["pilot_only"]
        else "| Pilot alone | (loaded) |",
        f"| Pilot + Copilot (joint) | {times['joint'] * 1000:.0f} ms |" if times["joint"] else "| joint | (loaded) |",
        "",
        "Decode tokens/s: generated tokens (up to EOS) per second of wall time, batches of "
        f"{cfg.eval_batch_size}. The Copilot is not run at lambda = 0.",
        "",
        "Read this honestly: the Pilot is trained from scratch for a few minutes on a CPU; a Copilot "
        "trained from scratch beside it has little signal to correct (DESIGN.md section 2). The paper's "
        "gains come from pretrained Pilots and Copilots initialised from pretrained layers.",
    ]
    text = "\n".join(lines) + "\n"
    with open(os.path.join(cfg.run_dir, "report.md"), "w") as fh:
        fh.write(text)
    return text


def run_experiment(cfg: ExperimentConfig | None = None, progress: bool = True) -> str:
    cfg = cfg or ExperimentConfig()
    t_start = time.perf_counter()
    rank = dist_info()[0]  # under torchrun: every rank trains, rank 0 alone writes files and evaluates
    os.makedirs(cfg.run_dir, exist_ok=True)
    torch.manual_seed(cfg.seed)
    train_items = generate_arithmetic(cfg.n_train, split="train", seed=cfg.seed)
    test_items = generate_arithmetic(cfg.n_test, split="test", seed=cfg.seed + 1)
    tok_path = os.path.join(cfg.run_dir, "tokenizer.json")
    tok_exists = os.path.exists(tok_path)
    barrier()  # several processes: every rank has looked before rank 0 writes
    if tok_exists:
        tok = WordTokenizer.load(tok_path)
    else:
        # The vocabulary covers the test templates' words too: a word never seen in training keeps its
        # random embedding, which is the honest "new phrasing" condition, and no answer leaks.
        # The prompt template's own words ("Q:", "A:") must be in the vocabulary too, not <unk>.
        texts = [format_prompt(x, style=cfg.style) + " " + x["output"] for x in train_items + test_items]
        tok = WordTokenizer.build(texts)
        if rank == 0:
            tok.save(tok_path)
    examples = [encode_example(tok, x, cfg.max_length, style=cfg.style) for x in train_items]
    if rank == 0:
        with open(os.path.join(cfg.run_dir, "config.json"), "w") as fh:
            json.dump(asdict(cfg), fh, indent=2, default=str)

    pilot_only, t_p = _load_or_train("pilot_only", cfg, tok, examples, False, progress)
    joint, t_j = _load_or_train("joint", cfg, tok, examples, True, progress)
    if rank != 0:  # the caller (tcopilot train) waits at a barrier while rank 0 evaluates
        return ""
    rows = evaluation_grid(cfg, pilot_only, joint, tok, test_items, progress)
    sizes = {"pilot": param_count(joint.pilot), "copilot": param_count(joint.copilot)}
    report = write_report(cfg, rows, {"pilot_only": t_p, "joint": t_j}, sizes, time.perf_counter() - t_start)
    with open(os.path.join(cfg.run_dir, "results.json"), "w") as fh:
        json.dump([{k: v for k, v in r.items() if k != "predictions"} for r in rows], fh, indent=1)
    return report


__all__ = ["ExperimentConfig", "run_experiment", "load_run_model", "build_pilot", "sign_test", "resolve_device"]
