"""Aggregate several ``examples/reproduce.py`` runs (one per seed) into the tables of the reproduction report.

    python examples/reproduce_report.py RUN_DIR_SEED0 RUN_DIR_SEED1 RUN_DIR_SEED2 > table.md

Each RUN_DIR holds the ``results.json`` of one run. Rows are matched across runs by (test set, system, fusion,
lambda, beams). Per row: accuracy as mean and sample standard deviation over the seeds; how many answers differ
from the Pilot alone's; the Copilot's effect as the paired sign test over every (seed, question) pair; and the
relative improvement of the mean accuracy. "Pilot alone" is always the same run's Pilot decoded the same way
(greedy or the same number of beams).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir))

from tcopilot.experiment import sign_test  # noqa: E402

BASE_SYSTEMS = ("Pilot alone (trained without Copilot)", "Pilot of the joint run, Copilot off")
TEST_NAMES = {"mawps": "MAWPS", "svamp": "SVAMP", "addsub": "AddSub", "singleeq": "SingleEq", "boolq": "BoolQ",
              "openbookqa": "OpenBookQA", "all": "all sets pooled"}


def _key(row: dict) -> tuple:
    return (row["test"], row["system"], row["fusion"], float(row["lam"]), int(row.get("beams", 1)))


def _baseline(rows: list[dict], test: str, beams: int) -> dict:
    """The run's Pilot-alone row for ``test`` decoded with ``beams`` (the separately trained one if present)."""
    for system in BASE_SYSTEMS:
        for r in rows:
            if r["test"] == test and r["system"] == system and int(r.get("beams", 1)) == beams:
                return r
    raise ValueError(f"results: no Pilot-alone row for test {test!r} with beams={beams}")


def with_pooled(result: dict, name: str = "all") -> dict:
    """``result`` plus rows ``test=name`` that pool every test set's questions per (system, fusion, lambda, beams)."""
    pooled: dict[tuple, dict] = {}
    for r in result["rows"]:
        key = _key(r)[1:]
        acc = pooled.setdefault(key, {**r, "test": name, "n": 0, "correct": [], "predictions": []})
        acc["n"] += r["n"]
        acc["correct"] = acc["correct"] + list(r["correct"])
        acc["predictions"] = acc["predictions"] + list(r.get("predictions", [None] * r["n"]))
    for acc in pooled.values():
        acc["accuracy"] = sum(acc["correct"]) / acc["n"]
    return {**result, "rows": result["rows"] + list(pooled.values())}


def aggregate(results: list[dict]) -> list[dict]:
    """One summary per row key, in the first run's row order."""
    keys = [_key(r) for r in results[0]["rows"]]
    out = []
    for key in keys:
        accs, base_accs, base_bits, bits, changed = [], [], [], [], 0
        for res in results:
            match = [r for r in res["rows"] if _key(r) == key]
            if not match:
                raise ValueError(f"results: row {key} is missing from a run ({res.get('args', {}).get('run_dir')})")
            row = match[0]
            base = _baseline(res["rows"], key[0], key[4])
            accs.append(row["accuracy"])
            base_accs.append(base["accuracy"])
            bits += row["correct"]
            base_bits += base["correct"]
            if "predictions" in row and "predictions" in base:
                changed += sum(a != b for a, b in zip(row["predictions"], base["predictions"]))
        gained, lost, p = sign_test(base_bits, bits)
        mean, base_mean = statistics.mean(accs), statistics.mean(base_accs)
        out.append({
            "test": key[0], "system": key[1], "fusion": key[2], "lam": key[3], "beams": key[4],
            "n": results[0]["rows"][keys.index(key)]["n"], "seeds": len(results),
            "acc_mean": mean, "acc_std": statistics.stdev(accs) if len(accs) > 1 else 0.0, "accs": accs,
            "rel": (mean - base_mean) / base_mean if base_mean > 0 else float("nan"),
            "gained": gained, "lost": lost, "sign_p": p, "changed": changed,
        })
    return out


def _decoding(beams: int) -> str:
    return "greedy" if beams == 1 else f"{beams} beams"


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def markdown(summary: list[dict]) -> str:
    """The paper-layout table (Pilot vs best Copilot setting per test set) and the table of every row."""
    lines = ["| test set (n per seed) | decoding | Pilot alone | + Copilot, best setting | relative improvement |",
             "|---|---|---|---|---|"]
    for test in dict.fromkeys(s["test"] for s in summary):
        for beams in sorted({s["beams"] for s in summary if s["test"] == test}):
            rows = [s for s in summary if s["test"] == test and s["beams"] == beams]
            base = next((s for s in rows if s["system"] in BASE_SYSTEMS and s["lam"] == 0.0), None)
            cop = [s for s in rows if s["lam"] != 0.0]
            if base is None or not cop:
                continue
            best = max(cop, key=lambda s: s["acc_mean"])
            lines.append(
                f"| {TEST_NAMES.get(test, test)} ({base['n']}) | {_decoding(beams)} | "
                f"{_pct(base['acc_mean'])} ± {_pct(base['acc_std'])} | "
                f"{_pct(best['acc_mean'])} ± {_pct(best['acc_std'])} ({best['fusion']} {best['lam']:g}) | "
                f"{100 * best['rel']:+.1f}% |")
    lines += ["", "| test | decoding | system | fusion | lambda | accuracy % (mean ± sd over seeds) | per seed | "
              "rel. vs Pilot alone | answers changed (all seeds) | gained / lost (all seeds) | sign-test p |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for s in summary:
        per_seed = " / ".join(_pct(a) for a in s["accs"])
        is_base = s["system"] in BASE_SYSTEMS and s["lam"] == 0.0
        rel = "-" if is_base else f"{100 * s['rel']:+.1f}%"
        counts = "-" if is_base else f"+{s['gained']} / -{s['lost']}"
        p_value = "-" if is_base else f"{s['sign_p']:.3f}"
        n_changed = "-" if is_base else f"{s['changed']} / {s['n'] * s['seeds']}"
        lines.append(
            f"| {TEST_NAMES.get(s['test'], s['test'])} | {_decoding(s['beams'])} | {s['system']} | {s['fusion']} | "
            f"{s['lam']:g} | {_pct(s['acc_mean'])} ± {_pct(s['acc_std'])} | {per_seed} | {rel} | {n_changed} | "
            f"{counts} | {p_value} |")
    return "\n".join(lines)


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run_dirs", nargs="+", help="folders holding a results.json each (one per seed)")
    p.add_argument("--no-pooled", action="store_true", help="leave out the rows pooling every test set")
    args = p.parse_args(argv)
    results = []
    for d in args.run_dirs:
        with open(os.path.join(d, "results.json")) as fh:
            res = json.load(fh)
        multi = len({r["test"] for r in res["rows"]}) > 1
        results.append(with_pooled(res) if multi and not args.no_pooled else res)
    text = markdown(aggregate(results))
    print(text)
    return text


if __name__ == "__main__":
    main()
