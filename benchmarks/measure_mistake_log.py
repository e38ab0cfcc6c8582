"""Numbers for issue 6 (the compressed Mistake Log), on the CPU.

1. Bytes per token of the compressed log against storing the full error vector and every layer's state
   (arithmetic, d=4096, V=128256, 32 layers).
2. Top-k approximation error (k = 8, 32, 128) on the default task: a tiny Pilot + Copilot trained jointly
   (online) for ``--steps`` steps, then measured on held-out test problems: residual probability mass,
   relative L2 error of the rebuilt error vector, and the relative error of the Copilot's loss computed
   from the compressed log (replay path) against the exact online loss.
3. ``log_mode="online"`` vs ``"replay"``: the same seed, data order and number of steps; exact-match accuracy
   on the test split with the Copilot off (lambda=0) and on (fusion="probs", lambda 0.5 and 1).

    python benchmarks/measure_mistake_log.py --steps 300 --out /tmp/ml
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from tcopilot import logit_capture
from tcopilot.copilot import Copilot
from tcopilot.data.arithmetic import generate_arithmetic
from tcopilot.data.prompts import collate, encode_example
from tcopilot.data.tokenizer import WordTokenizer
from tcopilot.evaluate import evaluate_accuracy
from tcopilot.experiment import ExperimentConfig, build_pilot
from tcopilot.mistake_log import MistakeLog, log_bytes_per_token, naive_bytes_per_token
from tcopilot.pilot import (
    TransformerCopilot,
    lm_head_operands,
    pilot_states,
    positions_from_mask,
    run_base,
    shift_labels,
)
from tcopilot.replay import replay_copilot_loss
from tcopilot.train import TrainConfig, Trainer


def bytes_table() -> list[str]:
    d, vocab, layers = 4096, 128256, 32
    naive32 = naive_bytes_per_token(d, vocab, layers, 4)
    naive16 = naive_bytes_per_token(d, vocab, layers, 2)
    lines = [f"naive per token (error vector V={vocab} + X~ + {layers} layer states, d={d}): "
             f"{naive32:,} B fp32, {naive16:,} B bf16"]
    for k in (8, 32, 128):
        for pooled, tk in (("bfloat16", "float32"), ("int8", "float32"), ("int8", "float16")):
            b = log_bytes_per_token(d, k, pooled, tk)
            lines.append(f"log k={k:>3} pooled={pooled:<8} topk={tk:<7}: {b:>7,.0f} B/token "
                         f"({naive32 / b:,.0f}x smaller than fp32 naive, {naive16 / b:,.0f}x than bf16)")
    return lines


def setup(seed=0):
    cfg = ExperimentConfig()
    train = generate_arithmetic(cfg.n_train, split="train", seed=seed)
    test = generate_arithmetic(cfg.n_test, split="test", seed=seed + 1)
    tok = WordTokenizer.build([x["instruction"] + " " + x["output"] for x in train + test])
    examples = [encode_example(tok, x, cfg.max_length, style=cfg.style) for x in train]
    test_examples = [encode_example(tok, x, cfg.max_length, style=cfg.style) for x in test]
    return cfg, tok, train, test, examples, test_examples


def train_joint(cfg, tok, examples, steps, log_mode, run_dir):
    torch.manual_seed(cfg.seed)
    pilot = build_pilot(tok.vocab_size, cfg, tok.pad_token_id)
    copilot = Copilot.from_pilot(pilot, num_hidden_layers=cfg.copilot_layers)
    model = TransformerCopilot(pilot, copilot, log_mode=log_mode)
    tc = TrainConfig(**{**cfg.train.__dict__, "steps": steps, "ckpt_every": 0, "keep_log": False})
    t0 = time.perf_counter()
    tr = Trainer(model, examples, tc, run_dir, pad_token_id=tok.pad_token_id, progress=False)
    tr.train()
    return model, time.perf_counter() - t0, tr


@torch.no_grad()
def topk_errors(model, tok, test_examples, ks=(8, 32, 128)) -> list[str]:
    vocab = model.pilot.get_output_embeddings().weight.shape[0]
    batch = collate(test_examples[:128], tok.pad_token_id)
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    model.eval()
    exact = float(model(ids, attention_mask=mask, labels=labels).copilot_loss)
    if vocab > 4096:
        raise ValueError("this measurement materialises [tokens x V]; use a small vocabulary")
    lines = [f"vocabulary V={vocab}; 128 test problems; exact online Copilot RMSE {exact:.6f}"]
    for k in ks:
        for pooled in ("float32", "bfloat16", "int8"):
            if pooled != "float32" and k != 32:
                continue
            model.train()  # pushing happens in training mode only; no optimiser step is taken
            model.mistake_log, model.log_mode = MistakeLog(topk=min(k, vocab), pooled_dtype=pooled), "online"
            with torch.enable_grad():
                model(ids, attention_mask=mask, labels=labels)
            model.eval()
            e = model.mistake_log[0]
            counted = e.counted()
            res = e.residual_mass()
            # ||ell - ell^||^2 = sum of p^2 over the ids not kept; ||ell||^2 = 1 - 2 p_y + sum p^2.
            pos = positions_from_mask(mask)
            with pilot_states(model.pilot):
                hidden, _ = run_base(model.pilot.base_model, ids, mask, pos.clamp(min=0))
            tgt = shift_labels(labels).reshape(-1)
            # The Pilot's own head operands (its logit scale and head bias folded in), as the training step uses.
            head_in, head_w, head_b = lm_head_operands(model.pilot.get_output_embeddings(),
                                                       hidden.reshape(-1, hidden.shape[-1]), model.logit_scale)
            cap = logit_capture(head_in, head_w, tgt, bias=head_b, softcap=model.softcap, topk=min(k, vocab))
            c = tgt != -100
            # Small vocabulary: materialise p in fp64 for an exact ||ell - ell^|| (the statistics-only form
            # S2 - sum_kept p^2 cancels to ~1e-7 per row in fp32).
            z = head_in[c].double() @ head_w.double().T
            if head_b is not None:
                z = z + head_b.double()
            if model.softcap is not None:
                z = model.softcap * torch.tanh(z / model.softcap)
            p = z.softmax(1)
            ell = torch.nn.functional.one_hot(tgt[c], vocab).double() - p
            kept = torch.zeros_like(p, dtype=torch.bool).scatter_(1, cap.topk_ids[c], True)
            ell_hat = torch.where(kept, ell, torch.zeros_like(ell))
            ell_hat.scatter_(1, tgt[c][:, None], ell.gather(1, tgt[c][:, None]) + (~kept).gather(
                1, tgt[c][:, None]).double() * p.gather(1, tgt[c][:, None]))  # label entry is 1 when not kept
            rel_l2 = float(((ell - ell_hat) ** 2).sum().sqrt() / (ell**2).sum().sqrt())
            with torch.enable_grad():
                replay = float(replay_copilot_loss(model, e).detach())
            model.mistake_log = None
            lines.append(
                f"k={k:>3} pooled={pooled:<8}: residual mass mean {float(res.mean()):.2e} "
                f"p99 {float(res.quantile(0.99)):.2e} max {float(res.max()):.2e}; "
                f"rel L2 error of ell^ {rel_l2:.2e}; replay RMSE {replay:.6f} "
                f"(rel err {abs(replay - exact) / exact:.2e}); {e.nbytes / int(counted.numel()):.0f} B/row")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--out", default="/tmp/measure_mistake_log")
    ap.add_argument("--skip-replay", action="store_true")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    report = ["## bytes per token", *bytes_table()]
    print("\n".join(report), flush=True)
    cfg, tok, _, test, examples, test_examples = setup()
    online, t_on, tr_on = train_joint(cfg, tok, examples, args.steps, "online", os.path.join(args.out, "online"))
    report += ["", f"## top-k approximation (joint model trained online for {args.steps} steps, {t_on:.0f} s)"]
    report += topk_errors(online, tok, test_examples)
    print("\n".join(report[-5:]), flush=True)
    if not args.skip_replay:
        replay, t_re, tr_re = train_joint(cfg, tok, examples, args.steps, "replay", os.path.join(args.out, "replay"))
        report += ["", f"## online vs replay ({args.steps} steps each, same seed and data order; "
                   f"train time online {t_on:.0f} s, replay {t_re:.0f} s; replay buffer "
                   f"{replay.mistake_log.usage()['bytes'] / 2**20:.1f} MiB)"]
        rows = {}
        for name, model in (("online", online), ("replay", replay)):
            for lam in (0.0, 0.5, 1.0):
                r = evaluate_accuracy(model, tok, test, lam=lam, fusion="probs", style=cfg.style,
                                      batch_size=cfg.eval_batch_size, max_new_tokens=cfg.max_new_tokens)
                rows[(name, lam)] = r["accuracy"]
                report.append(f"{name:<7} lambda={lam}: accuracy {100 * r['accuracy']:.1f}% on {len(test)}")
                print(report[-1], flush=True)
        last_on = json.loads(open(os.path.join(args.out, "online", "metrics.jsonl")).readlines()[-1])
        last_re = json.loads(open(os.path.join(args.out, "replay", "metrics.jsonl")).readlines()[-1])
        report.append(f"final logged losses: online pilot {last_on['pilot_loss']:.4f} copilot "
                      f"{last_on['copilot_loss']:.4f}; replay pilot {last_re['pilot_loss']:.4f} copilot "
                      f"{last_re['copilot_loss']:.4f} (replay's Copilot loss is on a sampled buffered step)")
    text = "\n".join(report) + "\n"
    with open(os.path.join(args.out, "report.md"), "w") as fh:
        fh.write(text)
    print(text)


if __name__ == "__main__":
    main()
