"""pytest-benchmark JSON -> a Markdown report and a long-format CSV.

Usage::

    python benchmarks/report.py results.json [more.json ...] --out report.md --csv out.csv \
        [--ceilings ceilings.json] [--title "H100 run"]

Reads the ``extra_info`` that ``benchutil.run_bench`` stores (op, shape, dtype, mode, provider, flop or byte
model, peak memory, versions) and writes:

* per op, one table with every provider of every (shape, dtype, mode) group: median time, IQR, speedup over
  the ``naive`` provider of the group, TFLOP/s (compute-bound ops) or GB/s (memory-bound ops), the fraction
  of the measured ceiling (``--ceilings``: ``matmul_tflops`` and ``copy_gbps``, from ``ceilings.py``) and
  peak memory;
* a summary of our kernel (``triton``, else ``torch``) against the fastest peer and the roofline per group;
* for ``e2e``: time, peak memory, overhead over the Pilot alone and model-flop utilisation per Copilot size,
  and the issue-7 targets (joint training step at least 1.5x faster and 3x lighter than the naive way; MFU at
  least 0.9x the Pilot-alone step's);
* the CSV: one row per (benchmark, metric) with p50 / p25 / p75, device and versions.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
from collections import OrderedDict
from pathlib import Path

OP_ORDER = ["logit_capture", "log_attention", "rectified_next_token", "e2e", "generate"]
PROVIDER_ORDER = ["naive", "compile", "torch_lce", "liger", "cce", "sdpa", "flex", "torch", "triton_rowwise", "triton",
                  "triton_seed", "copilot_alone", "eager", "static", "graph", "graph_reused"]
BASELINES = ("naive", "eager")  # the "vs naive" column's reference: a group's naive provider, else its eager one
PEERS = {"compile", "torch_lce", "liger", "cce", "sdpa", "flex"}
OURS = ("triton", "torch")  # preference order for "our kernel" in a group
MODE_ORDER = {"fwd": 0, "fwd_bwd": 1, "greedy": 2, "topk_topp": 3, "topp": 4, "train": 5, "decode": 6}
TARGETS = {"speedup": 1.5, "memory": 3.0, "mfu_ratio": 0.9}  # issue 7, joint training step


# --------------------------------------------------------------------------------------------- loading


def load(paths: list[Path]) -> tuple[list[dict], list[dict], dict]:
    """Rows of our benchmarks, rows of other benchmarks, and run metadata (the first file's)."""
    rows: OrderedDict[tuple, dict] = OrderedDict()
    others, meta = [], {}
    for path in paths:
        try:
            if Path(path).suffix == ".jsonl":  # conftest.py's per-case records (TCOPILOT_BENCH_JSONL)
                lines = Path(path).read_text().splitlines()
                # a last line cut mid-write is dropped; the others were written whole
                data = {"benchmarks": [json.loads(line) for line in lines[:-1] if line.strip()]}
                if lines:
                    try:
                        data["benchmarks"].append(json.loads(lines[-1]))
                    except json.JSONDecodeError:
                        pass
            else:
                data = json.loads(Path(path).read_text())
        except json.JSONDecodeError as err:  # cut short while written (a stage killed at its deadline)
            print(f"report.py: skipping {path}, not valid JSON ({err})")
            others.append({"name": str(path), "median": None, "note": f"not valid JSON, skipped: {err}"})
            continue
        if not meta:
            meta = {
                "datetime": data.get("datetime", ""),
                "machine": data.get("machine_info", {}),
                "commit": data.get("commit_info", {}),
            }
        for b in data.get("benchmarks", []):
            info, st = b.get("extra_info", {}), b.get("stats", {})
            if "op" not in info:
                others.append({"name": b.get("name"), "median": st.get("median"), "note": ""})
                continue
            if "median_s" not in info:  # stopped mid-run (a deadline's SIGINT): partial rounds only
                others.append({"name": b.get("name"), "median": st.get("median"),
                               "note": f"interrupted after {st.get('rounds')} rounds: not in the tables"})
                continue
            row = dict(info)
            row.update(name=b.get("name"), group=b.get("group"), median=st.get("median"), q1=st.get("q1"),
                       q3=st.get("q3"), rounds=st.get("rounds"))
            key = (row["op"], row["shape"], row["dtype"], row["mode"], row["provider"])
            rows.pop(key, None)
            rows[key] = row  # a later file wins
    return list(rows.values()), others, meta


def throughput(row: dict, t: float | None) -> tuple[float | None, str]:
    """(value, unit) of the row's work model at time ``t``: TFLOP/s when compute-bound, else GB/s."""
    if not t:
        return None, ""
    if row.get("bound") == "compute" and row.get("flops"):
        return row["flops"] / t / 1e12, "TFLOP/s"
    if row.get("bytes"):
        return row["bytes"] / t / 1e9, "GB/s"
    if row.get("flops"):
        return row["flops"] / t / 1e12, "TFLOP/s"
    return None, ""


def roofline(row: dict, ceilings: dict | None) -> float | None:
    value, unit = throughput(row, row.get("median"))
    if not ceilings or value is None:
        return None
    ceiling = ceilings.get("matmul_tflops") if unit == "TFLOP/s" else ceilings.get("copy_gbps")
    return value / ceiling if ceiling else None


def group_key(row: dict) -> tuple:
    return (row["op"], row["shape"], row["dtype"], row["mode"])


def sort_key(row: dict) -> tuple:
    op = OP_ORDER.index(row["op"]) if row["op"] in OP_ORDER else len(OP_ORDER)
    prov = row["provider"]
    pi = PROVIDER_ORDER.index(prov) if prov in PROVIDER_ORDER else len(PROVIDER_ORDER)
    return (op, row["shape"], row["dtype"], MODE_ORDER.get(row["mode"], 99), pi, prov)


def by_group(rows: list[dict]) -> OrderedDict:
    groups: OrderedDict[tuple, list[dict]] = OrderedDict()
    for row in sorted(rows, key=sort_key):
        groups.setdefault(group_key(row), []).append(row)
    return groups


# ------------------------------------------------------------------------------------------ formatting


def fmt(x, spec: str = ".3g", none: str = "-") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return none
    return format(x, spec)


def ms(t: float | None) -> str:
    if t is None:
        return "-"
    v = t * 1e3
    return f"{v:.3f}" if v < 1 else f"{v:.2f}" if v < 100 else f"{v:.0f}"


def pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def table(header: list[str], body: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in body]
    return out


def mem_cells(row: dict) -> tuple[str, str]:
    return fmt(row.get("peak_mem_mb"), ".0f"), fmt(row.get("mem_growth_mb"), ".0f")


# ---------------------------------------------------------------------------------------------- report


def header_lines(rows: list[dict], meta: dict, ceilings: dict | None, title: str) -> list[str]:
    first = rows[0] if rows else {}
    commit = meta.get("commit", {})
    cid = commit.get("id", "")[:10] + (" (dirty)" if commit.get("dirty") else "") if commit.get("id") else "-"
    devices = sorted({r.get("device_name", "?") for r in rows})
    lines = [
        f"# {title}",
        "",
        f"- run: {meta.get('datetime', '-')}, tcopilot commit {cid}",
        f"- device: {', '.join(devices) or '-'} ({first.get('device', '-')})",
        f"- versions: torch {first.get('torch', '-')}, triton {first.get('triton') or '-'}, "
        f"CUDA {first.get('cuda') or '-'}, transformers {first.get('transformers') or '-'}, "
        f"python {first.get('python', '-')}; scope {first.get('scope', '-')}",
    ]
    if first.get("autotune") is False and first.get("device") == "cuda":  # (autotuning is CUDA-only)
        lines.append("- log_attention autotuning off (`TCOPILOT_AUTOTUNE=0`): its kernels ran their table "
                     "configuration, one of the autotune candidates, so autotuned runs can only match or beat these")
    if ceilings:
        lines.append(
            f"- measured ceilings ({ceilings.get('device_name', '-')}): matmul "
            f"{fmt(ceilings.get('matmul_tflops'), '.4g')} TFLOP/s ({ceilings.get('matmul_desc', '-')}), "
            f"copy {fmt(ceilings.get('copy_gbps'), '.4g')} GB/s ({ceilings.get('copy_desc', '-')})"
        )
    methods = sorted({r.get("mem_method") for r in rows if r.get("mem_method")})
    lines += [
        "",
        "Times are medians over the timed rounds (IQR = q3 - q1), each round synchronised. *vs naive* = the "
        "naive provider's median / this median. Throughput comes from the written work model of each op "
        "(flops for compute-bound ops, bytes for memory-bound ones); *roofline* = throughput / the measured "
        "ceiling (bf16 matmul or device copy). *peak* = peak allocated memory during one call (inputs "
        "included), *+MiB* = its growth over the memory allocated before the call. Memory method: "
        + (", ".join(methods) or "-")
        + ".",
        "",
    ]
    return lines


def op_section(op: str, groups: OrderedDict, ceilings: dict | None) -> list[str]:
    body = []
    for (g_op, shape, dtype, mode), rows in groups.items():
        if g_op != op:
            continue
        naive = next((r["median"] for b in BASELINES for r in rows if r["provider"] == b), None)
        for i, r in enumerate(rows):
            value, unit = throughput(r, r.get("median"))
            iqr = r["q3"] - r["q1"] if r.get("q3") is not None and r.get("q1") is not None else None
            speed = naive / r["median"] if naive and r.get("median") else None
            peak, growth = mem_cells(r)
            provider = r["provider"] + (f" ({r['vocab_passes']:g} passes)" if r.get("vocab_passes") else "")
            body.append([
                shape if i == 0 else "", dtype if i == 0 else "", mode if i == 0 else "", provider,
                ms(r.get("median")), ms(iqr), fmt(speed, ".2f") + ("x" if speed else ""),
                f"{fmt(value, '.3g')} {unit}".strip(), pct(roofline(r, ceilings)), peak, growth,
            ])
    if not body:
        return []
    header = ["shape", "dtype", "mode", "provider", "median ms", "IQR ms", "vs naive", "throughput",
              "roofline", "peak MiB", "+MiB"]
    return [f"## {op}", ""] + table(header, body) + [""]


def summary_section(groups: OrderedDict, ceilings: dict | None) -> list[str]:
    body = []
    for (op, shape, dtype, mode), rows in groups.items():
        if op == "e2e":
            continue
        by_prov = {r["provider"]: r for r in rows}
        ours = next((by_prov[p] for p in OURS if p in by_prov), None)
        if ours is None:
            continue
        peers = [r for r in rows if r["provider"] in PEERS and r.get("median")]
        peer = min(peers, key=lambda r: r["median"]) if peers else None
        naive = by_prov.get("naive")
        body.append([
            op, shape, dtype, mode, ours["provider"], ms(ours["median"]),
            peer["provider"] if peer else "-", ms(peer["median"]) if peer else "-",
            fmt(peer["median"] / ours["median"], ".2f") + "x" if peer else "-",
            fmt(naive["median"] / ours["median"], ".2f") + "x" if naive else "-",
            pct(roofline(ours, ceilings)),
        ])
    if not body:
        return []
    header = ["op", "shape", "dtype", "mode", "ours", "ours ms", "best peer", "peer ms", "peer/ours",
              "naive/ours", "ours roofline"]
    return ["## Our kernels against the best peer", "",
            "*peer/ours* > 1: ours is faster. Ours = the Triton kernel where it ran, else the PyTorch path.",
            ""] + table(header, body) + [""]


def e2e_section(rows: list[dict], ceilings: dict | None) -> list[str]:
    e2e = [r for r in rows if r["op"] == "e2e"]
    if not e2e:
        return []
    out = ["## End to end (e2e)", "",
           "Copilot 0 = the Pilot alone. *overhead* = this step / the Pilot-alone step of the same way "
           "(the naive Pilot-alone step where that way has none) - 1. *MFU* = model flops "
           "(bench_e2e.flop_model) / time / the measured matmul ceiling; *MFU ratio* = MFU / the "
           "Pilot-alone MFU of the same way (no ceiling needed: a ratio of flop rates). Decode steps are "
           "memory-bound: their throughput counts the bytes of every weight and cache read once.", ""]
    for step in ("train", "decode"):
        srows = sorted((r for r in e2e if r["mode"] == step), key=lambda r: (r.get("copilot_layers", 0),
                       PROVIDER_ORDER.index(r["provider"]) if r["provider"] in PROVIDER_ORDER else 99))
        if not srows:
            continue
        base = {r["provider"]: r for r in srows if r.get("copilot_layers", 0) == 0}
        body = []
        for r in srows:
            b = base.get(r["provider"]) or base.get("naive")
            over = r["median"] / b["median"] - 1 if b and r.get("copilot_layers") else None
            value, unit = throughput(r, r.get("median"))
            mfu = roofline(r, ceilings)
            bvalue = throughput(b, b["median"])[0] if b else None
            peak, growth = mem_cells(r)
            body.append([
                r["shape"].split(" copilot=")[0] if r is srows[0] else "", str(r.get("copilot_layers", "?")),
                r["provider"], ms(r["median"]), peak, growth,
                "-" if over is None else f"{100 * over:+.1f}%", f"{fmt(value, '.3g')} {unit}".strip(),
                pct(mfu), fmt(value / bvalue, ".2f") if value and bvalue else "-",
            ])
        header = ["model / batch", "copilot layers", "way", "median ms", "peak MiB", "+MiB", "overhead",
                  "throughput", "MFU" if step == "train" else "roofline",
                  "MFU ratio" if step == "train" else "bandwidth ratio"]
        out += [f"### {step} step", ""] + table(header, body) + [""]
    out += targets_section(e2e, ceilings)
    out += coupling_section(e2e)
    return out


COUPLING_TARGET = 1.05  # issue 5: pair decode step <= 1.05 x (Pilot alone + the Copilot run alone)


def coupling_section(e2e: list[dict]) -> list[str]:
    """Issue 5: the pair's decode step over the Pilot-alone step plus the Copilot-alone step (bench_e2e)."""
    dec = [r for r in e2e if r["mode"] == "decode" and r.get("median")]
    pilot = next((r for r in dec if not r.get("copilot_layers") and r["provider"] == "naive"), None)
    if pilot is None:
        return []
    body = []
    for layers in sorted({r.get("copilot_layers") for r in dec if r.get("copilot_layers")}):
        same = {r["provider"]: r for r in dec if r.get("copilot_layers") == layers}
        ours = next((same[p] for p in OURS if p in same), None)
        alone = same.get("copilot_alone")
        if ours is None or alone is None:
            continue
        ratio = ours["median"] / (pilot["median"] + alone["median"])
        miss = ratio - COUPLING_TARGET
        verdict_text = f"{ratio:.3f} ({'met' if miss <= 0 else f'missed by {miss:.3f}'})"
        body.append([str(layers), ours["provider"], ms(pilot["median"]), ms(alone["median"]), ms(ours["median"]),
                     verdict_text])
    if not body:
        return []
    header = ["copilot layers", "ours", "Pilot alone ms", "Copilot alone ms", "pair ms",
              f"pair / (Pilot + Copilot) (<= {COUPLING_TARGET})"]
    return ["### Issue-5 coupling target (decode step)", "",
            "The pair's decode step against the Pilot's and the same Copilot's decode steps run alone: what the "
            "coupling costs (fed-back input, the Pilot's hooks and log entries, rectification instead of argmax).",
            ""] + table(header, body) + [""]


def _batch_from_shape(shape: str) -> str:
    """The ``B<n>`` of a shape text (results written before the benchmarks recorded ``batch`` on their own)."""
    return shape.split(" B")[1].split(" ")[0] if " B" in shape else "?"


def generate_section(rows: list[dict]) -> list[str]:
    """Per (batch, decoding mode, Copilot layers): ms per new token of each decoding way, and the overhead over the
    Pilot alone decoded the same way (the paper's inference overhead, Table 15)."""
    gen = [r for r in rows if r["op"] == "generate" and r.get("median")]
    if not gen:
        return []
    per_token = {}
    for r in gen:
        batch = str(r["batch"]) if r.get("batch") is not None else _batch_from_shape(r["shape"])
        key = (batch, r.get("mode", "greedy"), r.get("copilot_layers", 0), r["provider"])
        per_token[key] = r["median"] * 1e3 / r.get("new_tokens", 1)
    ways = [p for p in PROVIDER_ORDER if any(k[3] == p for k in per_token)]
    graph_ways = [w for w in ("graph", "graph_reused") if w in ways] or ["graph"]
    body = []
    order = sorted({k[:3] for k in per_token}, key=lambda k: (int(k[0]) if k[0].isdigit() else 0, k[1], k[2]))
    for batch, mode, layers in order:
        cells = [batch, mode, str(layers)]
        for way in ways:
            t, alone = per_token.get((batch, mode, layers, way)), per_token.get((batch, mode, 0, way))
            over = f" ({100 * (t / alone - 1):+.1f}%)" if t and alone and layers else ""
            cells.append("-" if t is None else f"{t:.2f}{over}")
        eager = per_token.get((batch, mode, layers, "eager"))
        for way in graph_ways:
            graph = per_token.get((batch, mode, layers, way))
            cells.append(f"{eager / graph:.2f}x" if eager and graph else "-")
        body.append(cells)
    header = ["batch", "mode", "copilot layers"] + [f"{w} ms/token (overhead)" for w in ways] + \
        [f"eager / {w.replace('_', ' ')}" for w in graph_ways]
    return ["## Decoding loops (generate)", "",
            "A whole `generate` call (prefill and, for `graph`, the capture included; `graph_reused`: a "
            "`GraphDecoder` call after its first, which captured) over its new tokens. "
            "*overhead* = this / the Pilot alone (Copilot 0, `lam=0`) decoded the same way - 1.", ""] + \
        table(header, body) + [""]


def verdict(x: float | None, target: float) -> str:
    if x is None:
        return "-"
    return f"{x:.2f} ({'met' if x >= target else f'missed by {target - x:.2f}'})"


def targets_section(e2e: list[dict], ceilings: dict | None) -> list[str]:
    train = [r for r in e2e if r["mode"] == "train"]
    naive = {r.get("copilot_layers"): r for r in train if r["provider"] == "naive"}
    base = {r["provider"]: r for r in train if r.get("copilot_layers") == 0}
    body = []
    for layers in sorted({r.get("copilot_layers") for r in train if r.get("copilot_layers")}):
        same = [r for r in train if r.get("copilot_layers") == layers]
        ours = next((r for p in OURS for r in same if r["provider"] == p), None)
        nv = naive.get(layers)
        if ours is None or nv is None:
            continue
        speed = nv["median"] / ours["median"]
        # Absolute peaks only (CUDA): the CPU runs' resident-set growth is too coarse for a ratio.
        mem = nv["peak_mem_mb"] / ours["peak_mem_mb"] if ours.get("peak_mem_mb") and nv.get("peak_mem_mb") else None
        b = base.get(ours["provider"])
        ratio = None
        if b and b.get("flops"):
            ratio = (b["median"] / ours["median"]) * (ours["flops"] / b["flops"])

        body.append([str(layers), ours["provider"], verdict(speed, TARGETS["speedup"]),
                     verdict(mem, TARGETS["memory"]), verdict(ratio, TARGETS["mfu_ratio"])])
    if not body:
        return []
    header = ["copilot layers", "ours", f"naive/ours time (>= {TARGETS['speedup']})",
              f"naive/ours peak (>= {TARGETS['memory']})",
              f"MFU / Pilot-alone MFU (>= {TARGETS['mfu_ratio']})"]
    return ["### Issue-7 targets (training step)", ""] + table(header, body) + [""]


def others_section(others: list[dict]) -> list[str]:
    if not others:
        return []
    body = [[o["name"], ms(o["median"]), o["note"]] for o in others]
    return ["## Other benchmarks", ""] + table(["name", "median ms", "note"], body) + [""]


def markdown(rows, others, meta, ceilings, title: str) -> str:
    groups = by_group(rows)
    lines = header_lines(rows, meta, ceilings, title)
    lines += summary_section(groups, ceilings)
    for op in OP_ORDER + sorted({r["op"] for r in rows} - set(OP_ORDER)):
        if op != "e2e":
            lines += op_section(op, groups, ceilings)
    lines += e2e_section(rows, ceilings)
    lines += generate_section(rows)
    lines += others_section(others)
    return "\n".join(lines).rstrip() + "\n"


# ------------------------------------------------------------------------------------------------- csv

CSV_COLUMNS = ["op", "shape", "dtype", "mode", "provider", "metric", "unit", "p50", "p25", "p75", "rounds",
               "device", "device_name", "torch", "triton", "cuda", "commit", "timestamp", "name"]


def csv_rows(rows: list[dict], meta: dict, ceilings: dict | None) -> list[dict]:
    out = []
    naive = {}
    for b in reversed(BASELINES):  # the first baseline present in a group wins
        naive.update({group_key(r): r["median"] for r in rows if r["provider"] == b})
    commit = meta.get("commit", {}).get("id", "")
    for r in rows:
        common = {k: r.get(k, "") for k in ("op", "shape", "dtype", "mode", "provider", "rounds", "device",
                                              "device_name", "torch", "triton", "cuda", "name")}
        common.update(commit=commit, timestamp=meta.get("datetime", ""))

        def add(metric, unit, p50, p25=None, p75=None, common=common):
            if p50 is not None:
                out.append(dict(common, metric=metric, unit=unit, p50=p50, p25=p25, p75=p75))

        t, q1, q3 = r.get("median"), r.get("q1"), r.get("q3")
        add("time", "ms", t * 1e3 if t else None, q1 * 1e3 if q1 else None, q3 * 1e3 if q3 else None)
        value, unit = throughput(r, t)
        add("throughput", unit, value, throughput(r, q3)[0], throughput(r, q1)[0])  # slower time, lower rate
        add("roofline_fraction", "", roofline(r, ceilings))
        base = naive.get(group_key(r))
        add("speedup_vs_naive", "x", base / t if base and t else None)
        add("peak_mem", "MiB", r.get("peak_mem_mb"))
        add("mem_growth", "MiB", r.get("mem_growth_mb"))
    return out


def write_csv(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: "" if row.get(k) is None else row.get(k) for k in CSV_COLUMNS})


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results", nargs="+", type=Path,
                    help="pytest-benchmark JSON file(s) (--benchmark-json), or .jsonl files of per-case records "
                    "(TCOPILOT_BENCH_JSONL)")
    ap.add_argument("--out", type=Path, help="Markdown report (default: print to stdout)")
    ap.add_argument("--csv", type=Path, help="long-format CSV")
    ap.add_argument("--ceilings", type=Path, help="ceilings.json from ceilings.py (matmul_tflops, copy_gbps)")
    ap.add_argument("--title", default="tcopilot benchmark report")
    args = ap.parse_args(argv)

    paths = [p for p in args.results if p.exists()]
    missing = [str(p) for p in args.results if not p.exists()]
    if missing:
        print(f"report.py: skipping missing files: {', '.join(missing)}")
    rows, others, meta = load(paths)
    ceilings = None
    if args.ceilings is not None and args.ceilings.exists():
        ceilings = json.loads(args.ceilings.read_text())
    text = markdown(rows, others, meta, ceilings, args.title)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
        print(f"report.py: wrote {args.out} ({len(rows)} benchmarks)")
    else:
        print(text)
    if args.csv:
        write_csv(args.csv, csv_rows(rows, meta, ceilings))
        print(f"report.py: wrote {args.csv}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
