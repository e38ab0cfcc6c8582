"""What the Pilot got wrong during fine-tuning: text reports and a plot from saved Mistake Logs.

Used by ``tcopilot inspect RUN_DIR``. A run directory holds ``mistake_log/`` (a :class:`MistakeLog` saved by
the Trainer) either directly or in its sub-runs (the main job's ``pilot_only/`` and ``joint/``). The
per-step history and the confusion / per-token counters cover every training step; the buffered entries
(the last R steps) supply example contexts.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable

from tcopilot.mistake_log import INDEX_NAME, MistakeLog

PLOT_HINT = "matplotlib is not installed: pip install 'tcopilot[plot]' (or pip install matplotlib) for the plot"


def find_logs(run_dir: str) -> dict[str, str]:
    """``{name: mistake_log directory}`` for ``run_dir`` itself (name ``"."``) and its direct sub-runs."""
    out = {}
    if os.path.exists(os.path.join(run_dir, "mistake_log", INDEX_NAME)):
        out["."] = os.path.join(run_dir, "mistake_log")
    if os.path.isdir(run_dir):
        for name in sorted(os.listdir(run_dir)):
            path = os.path.join(run_dir, name, "mistake_log")
            if os.path.exists(os.path.join(path, INDEX_NAME)):
                out[name] = path
    return out


def token_decoder(run_dir: str) -> Callable[[int], str] | None:
    """``id -> text`` from the run's ``tokenizer.json`` (a tcopilot WordTokenizer or a Hugging Face
    ``tokenizers`` file), looked up in ``run_dir`` and its parent; ``None`` when there is none."""
    for d in (run_dir, os.path.dirname(os.path.abspath(run_dir))):
        path = os.path.join(d, "tokenizer.json")
        if not os.path.exists(path):
            continue
        try:
            with open(path, encoding="utf-8") as fh:
                kind = json.load(fh).get("type")
        except (OSError, ValueError, AttributeError):
            kind = None
        if kind == "WordTokenizer":
            from tcopilot.data.tokenizer import SPACE, WordTokenizer

            tok = WordTokenizer.load(path)

            def word(i: int, tok=tok) -> str:
                return tok.id_to_token(i).replace(SPACE, " ") if 0 <= i < tok.vocab_size else f"<{i}>"

            return word
        try:
            from tokenizers import Tokenizer

            hf = Tokenizer.from_file(path)
            return lambda i: hf.decode([i], skip_special_tokens=False)
        except Exception:  # noqa: BLE001 - an unreadable tokenizer only costs the decoded text
            return None
    return None


def _show(decode, i: int) -> str:
    return repr(decode(i)) if decode is not None else f"#{i}"


def _context(entry, row: int, decode, width: int = 10) -> str:
    b, length = entry.input_ids.shape
    r, t = divmod(row, length)
    lo = max(0, t - width + 1)
    ids = entry.input_ids[r, lo : t + 1][entry.attention_mask[r, lo : t + 1]]
    if decode is None:
        return " ".join(str(int(i)) for i in ids)
    return "".join(decode(int(i)) for i in ids).strip()


def example_contexts(log: MistakeLog, label: int, pred: int, decode, limit: int = 1) -> list[str]:
    """Up to ``limit`` contexts from the buffered entries (newest first) where the Pilot's top-1 was ``pred``
    while the label was ``label``."""
    out = []
    for k in range(len(log) - 1, -1, -1):
        e = log[k]
        counted = e.counted(log.ignore_index)
        rows = counted.nonzero().squeeze(1)
        y = e.targets.reshape(-1)[counted].long()
        hit = ((y == label) & (e.topk_ids[:, 0].long() == pred)).nonzero().squeeze(1)
        for j in hit.tolist()[:limit - len(out)]:
            out.append(_context(e, int(rows[j]), decode))
        if len(out) >= limit:
            break
    return out


def format_report(name: str, log: MistakeLog, decode=None, top: int = 10, rows: int = 10) -> str:
    """The text ``tcopilot inspect`` prints for one saved log."""
    hist = log.history_table()
    u = log.usage()
    lines = [f"== Mistake Log of {name}: {len(hist)} steps seen, buffer {u['entries']}/{u['capacity']} "
             f"entries, {u['bytes'] / 2**20:.2f} MiB of {u['max_bytes'] / 2**20:.0f} MiB "
             f"({u['bytes_per_token']:.0f} bytes/token), top-k {log.topk}, pooled {log.pooled_dtype}"]
    if not hist:
        return "\n".join(lines + ["  (empty)"])
    lines.append("  error mass over training (means over counted tokens; error mass = 1 - p(label) "
                 "= ||ell||_1 / 2):")
    lines.append(f"  {'step':>6} {'tokens':>7} {'err mass':>9} {'||ell||^2':>9} {'loss':>7} "
                 f"{'top-k residual':>15}")
    idx = sorted({round(i * (len(hist) - 1) / max(1, rows - 1)) for i in range(rows)})
    for i in idx:
        h = hist[i]
        lines.append(f"  {h['step']:>6} {h['tokens']:>7} {h['err_mass']:>9.4f} {h['err_sq']:>9.4f} "
                     f"{h['nll']:>7.4f} {h['residual']:>15.2e}")
    conf = log.top_confusions(top)
    total_wrong = sum(log.confusions.values())
    total = int(log.token_count.sum())
    lines.append(f"  most frequent confusions (label -> Pilot's top-1), {total_wrong:,} wrong top-1 of "
                 f"{total:,} counted tokens:")
    for a, b, c in conf:
        ex = example_contexts(log, a, b, decode) if len(log) else []
        tail = f"   e.g. after '...{ex[0]}'" if ex else ""
        lines.append(f"  {c:>7}  {_show(decode, a)} -> {_show(decode, b)}{tail}")
    lines.append("  labels with the largest mean error mass (seen >= 5 times):")
    for i, m, c in log.worst_tokens(top):
        lines.append(f"  {m:>7.4f}  {_show(decode, i)}  ({c} times)")
    return "\n".join(lines)


def _metrics(run_dir: str) -> list[dict]:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as fh:
        return [r for r in (json.loads(x) for x in fh if x.strip()) if "pilot_loss" in r]


def plot_logs(logs: dict[str, tuple[MistakeLog, str]], path: str) -> bool:
    """Error mass and loss against step for each run in one PNG; ``False`` when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for name, (log, run) in logs.items():
        hist = log.history_table()
        steps = [h["step"] for h in hist]
        ax1.plot(steps, [h["err_mass"] for h in hist], label=f"{name}: 1 - p(label)")
        ax2.plot(steps, [h["nll"] for h in hist], label=f"{name}: Pilot token loss")
        recs = _metrics(run)
        if recs and "copilot_loss" in recs[0]:
            ax2.plot([r["step"] for r in recs], [r["copilot_loss"] for r in recs], "--",
                     label=f"{name}: Copilot RMSE")
    ax1.set(xlabel="step", ylabel="mean error mass", title="Pilot error mass")
    ax2.set(xlabel="step", ylabel="loss", title="losses", yscale="log")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def inspect_run(run_dir: str, top: int = 10, plot_path: str | None = "", out=print) -> int:
    """Print the report of every Mistake Log under ``run_dir`` and write the plot (``plot_path=""``: the
    default ``RUN_DIR/mistakes.png``; ``None``: no plot). Returns the number of logs found."""
    found = find_logs(run_dir)
    if not found:
        out(f"(no Mistake Log under {run_dir}: train with TrainConfig(keep_log=True) to keep one)")
        return 0
    decode = token_decoder(run_dir)
    if decode is None:
        out("(no tokenizer.json in the run directory: tokens are shown as ids)")
    logs = {}
    for name, path in found.items():
        log = MistakeLog.load(path, pin_memory=False)
        run = os.path.dirname(path)
        logs[name] = (log, run)
        label = name if name != "." else os.path.basename(os.path.abspath(run_dir))
        out(format_report(label, log, decode, top))
    if plot_path is not None:
        target = plot_path or os.path.join(run_dir, "mistakes.png")
        if plot_logs(logs, target):
            out(f"(plot written to {target})")
        else:
            out(f"({PLOT_HINT})")
    return len(found)


__all__ = ["find_logs", "token_decoder", "format_report", "plot_logs", "inspect_run", "example_contexts"]
