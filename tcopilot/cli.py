"""Command line: ``tcopilot train | eval | generate | inspect`` (also ``python -m tcopilot ...``)."""

from __future__ import annotations

import argparse
import json
import os
import sys


def _train(args) -> int:
    from tcopilot.experiment import ExperimentConfig, run_experiment
    from tcopilot.train import barrier, init_distributed

    if args.quiet:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()

    # under torchrun (WORLD_SIZE > 1) every rank trains its share; rank 0 alone writes and evaluates
    rank, world = init_distributed()
    cfg = ExperimentConfig(run_dir=args.run_dir, seed=args.seed, n_train=args.n_train, n_test=args.n_test,
                           copilot_layers=args.copilot_layers, pilot_layers=args.pilot_layers,
                           pilot_hidden=args.pilot_hidden, device=args.device)
    cfg.train.steps = args.steps
    cfg.train.seed = args.seed
    cfg.train.batch_size = args.batch_size
    cfg.train.grad_accum = args.grad_accum
    cfg.train.distributed = args.distributed
    if args.lr_pilot:
        cfg.train.lr_pilot = args.lr_pilot
    if args.lr_copilot:
        cfg.train.lr_copilot = args.lr_copilot
    cfg.train.ckpt_every = min(cfg.train.ckpt_every, args.steps)
    try:
        report = run_experiment(cfg, progress=not args.quiet)
        if rank == 0:
            print(report)
            print(f"(written to {os.path.join(cfg.run_dir, 'report.md')})")
        barrier()  # ranks > 0 wait here while rank 0 evaluates
    finally:
        if world > 1:
            import torch.distributed as dist

            dist.destroy_process_group()
    return 0


def _load_cfg(run_dir: str):
    from tcopilot.experiment import ExperimentConfig
    from tcopilot.train import TrainConfig

    path = os.path.join(run_dir, "config.json")
    if not os.path.exists(path):
        raise SystemExit(f"run_dir: expected a finished run directory with config.json, got {run_dir!r}")
    with open(path) as fh:
        raw = json.load(fh)
    train = raw.pop("train", None)
    raw["lams"] = tuple(raw.get("lams", (0.5, 1.0)))
    cfg = ExperimentConfig(**raw)
    if isinstance(train, dict):
        cfg.train = TrainConfig(**train)
    return cfg


def _check_num_beams(args) -> None:
    """``--num-beams`` (and, for ``generate``, its conflict with sampling), refused before any model is loaded."""
    if args.num_beams is not None and args.num_beams < 1:
        raise SystemExit(f"--num-beams: expected an int >= 1, got {args.num_beams}")
    if (args.num_beams or 1) > 1 and getattr(args, "temperature", 0.0) > 0:
        raise SystemExit(
            f"--num-beams {args.num_beams} and --temperature {args.temperature}: beam search does not sample; use "
            "--temperature 0 with beams, or --num-beams 1 to sample"
        )


def _eval(args) -> int:
    from tcopilot.copilot import param_count
    from tcopilot.data.arithmetic import generate_arithmetic
    from tcopilot.data.tokenizer import WordTokenizer
    from tcopilot.experiment import evaluation_grid, load_run_model, write_report

    _check_num_beams(args)
    cfg = _load_cfg(args.run_dir)
    cfg.device = args.device  # where this evaluation runs, whatever the training used
    if args.lam:
        cfg.lams = tuple(args.lam)
    cfg.eval_cuda_graph = args.cuda_graph
    if args.num_beams is not None:
        cfg.eval_num_beams = args.num_beams
    tok = WordTokenizer.load(os.path.join(args.run_dir, "tokenizer.json"))
    test = generate_arithmetic(args.n_test or cfg.n_test, split="test", seed=cfg.seed + 1)
    cfg.n_test = len(test)
    pilot_only = load_run_model(os.path.join(args.run_dir, "pilot_only"), args.device)
    joint = load_run_model(os.path.join(args.run_dir, "joint"), args.device)
    rows = evaluation_grid(cfg, pilot_only, joint, tok, test, progress=not args.quiet)
    sizes = {"pilot": param_count(joint.pilot), "copilot": param_count(joint.copilot)}
    print(write_report(cfg, rows, {"pilot_only": None, "joint": None}, sizes, 0.0))
    return 0


def _generate(args) -> int:
    import torch

    from tcopilot.data.prompts import encode_prompts
    from tcopilot.data.tokenizer import WordTokenizer
    from tcopilot.experiment import load_run_model

    _check_num_beams(args)
    cfg = _load_cfg(args.run_dir)
    tok = WordTokenizer.load(os.path.join(args.run_dir, "tokenizer.json"))
    model = load_run_model(os.path.join(args.run_dir, "joint"), args.device)
    items = [{"instruction": p, "input": "", "output": "", "answer": ""} for p in args.prompt]
    ids, mask = encode_prompts(tok, items, style=cfg.style, padding_side="left")
    dev = next(model.pilot.parameters()).device
    gen = torch.Generator(dev).manual_seed(args.seed)
    out = model.generate(ids.to(dev), attention_mask=mask.to(dev), max_new_tokens=args.max_new_tokens, lam=args.lam,
                         fusion=args.fusion, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                         num_beams=args.num_beams, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                         generator=gen)  # fmt: skip
    for p, row in zip(args.prompt, out[:, ids.shape[1]:].cpu().tolist()):
        if tok.eos_token_id in row:
            row = row[: row.index(tok.eos_token_id)]
        print(f"{p}\n  -> {tok.decode(row)}")
    return 0


def _inspect(args) -> int:
    if not os.path.isdir(args.run_dir):
        raise SystemExit(f"run_dir: expected a run directory, got {args.run_dir!r} (not a directory)")
    for name in (".", "pilot_only", "joint"):
        path = os.path.join(args.run_dir, name, "metrics.jsonl")
        if not os.path.exists(path):
            continue
        recs = [json.loads(line) for line in open(path)]
        recs = [r for r in recs if "pilot_loss" in r]
        print(f"{name}: {len(recs)} logged steps")
        for r in recs[:: max(1, len(recs) // 10)] + recs[-1:]:
            c = f"  copilot {r['copilot_loss']:.4f}" if "copilot_loss" in r else ""
            print(f"  step {r['step']:>5}  pilot {r['pilot_loss']:.4f}{c}")
    rep = os.path.join(args.run_dir, "report.md")
    if os.path.exists(rep):
        print(open(rep).read())
    from tcopilot.inspection import inspect_run

    inspect_run(args.run_dir, top=args.top, plot_path=None if args.no_plot else (args.plot or ""))
    return 0


DEVICE_CHOICES = ("auto", "cpu", "cuda")  # tcopilot.experiment.DEVICES, without importing torch for --help
DEVICE_HELP = "auto (default): CUDA when present (cuda:LOCAL_RANK under torchrun), else the CPU"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tcopilot", description=__doc__)
    sub = p.add_subparsers(dest="command")

    t = sub.add_parser("train", help="train a Pilot alone and with a Copilot, evaluate, write report.md")
    t.add_argument("--run-dir", default="runs/default")
    t.add_argument("--steps", type=int, default=300)
    t.add_argument("--batch-size", type=int, default=32)
    t.add_argument("--grad-accum", type=int, default=1)
    t.add_argument("--lr-pilot", type=float, default=None)
    t.add_argument("--lr-copilot", type=float, default=None)
    t.add_argument("--n-train", type=int, default=4000)
    t.add_argument("--n-test", type=int, default=300)
    t.add_argument("--pilot-layers", type=int, default=4)
    t.add_argument("--pilot-hidden", type=int, default=128)
    t.add_argument("--copilot-layers", type=int, default=2)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--distributed", choices=("ddp", "fsdp2"), default="ddp",
                   help="under torchrun with several processes: DDP or FSDP2 (--batch-size is the global batch)")
    t.add_argument("--device", choices=DEVICE_CHOICES, default="auto", help=DEVICE_HELP)
    t.add_argument("--quiet", action="store_true", help="no progress bars")
    t.set_defaults(fn=_train)

    e = sub.add_parser("eval", help="re-evaluate a finished run directory")
    e.add_argument("run_dir")
    e.add_argument("--lam", type=float, nargs="*")
    e.add_argument("--n-test", type=int, default=None)
    e.add_argument("--device", choices=DEVICE_CHOICES, default="auto", help=DEVICE_HELP)
    e.add_argument("--quiet", action="store_true")
    e.add_argument("--cuda-graph", action="store_true",
                   help="decode with one captured CUDA graph per setting (tcopilot.GraphDecoder; CUDA only)")
    e.add_argument("--num-beams", type=int, default=None, metavar="K",
                   help="beam search with K beams (the paper evaluates with 4); default: the run's eval_num_beams "
                        "(1, greedy)")
    e.set_defaults(fn=_eval)

    g = sub.add_parser("generate", help="answer prompts with the Pilot + Copilot of a run directory")
    g.add_argument("run_dir")
    g.add_argument("--prompt", action="append", required=True)
    g.add_argument("--lam", type=float, default=1.0)
    g.add_argument("--fusion", choices=("probs", "logits"), default="probs")
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--num-beams", type=int, default=1, metavar="K",
                   help="beam search with K beams (greedy beams: needs --temperature 0)")
    g.add_argument("--max-new-tokens", type=int, default=40)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", choices=DEVICE_CHOICES, default="auto", help=DEVICE_HELP)
    g.set_defaults(fn=_generate)

    i = sub.add_parser("inspect", help="what the Pilot got wrong: losses, error mass, confusions, plot")
    i.add_argument("run_dir")
    i.add_argument("--top", type=int, default=10, help="confusions and tokens to list")
    i.add_argument("--plot", default=None, help="PNG path (default RUN_DIR/mistakes.png)")
    i.add_argument("--no-plot", action="store_true")
    i.set_defaults(fn=_inspect)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "fn", None):
        parser.print_help()
        return 2
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
