"""``benchmarks/report.py`` on synthetic rows: the sections a GPU run's report is read for.

The GPU report is written once per lent GPU (``gpu_check.sh``), where a broken section costs the run: these
check the decode-coupling verdict (issue 5) and the decoding-loop table (``bench_graph_decode.py``) on rows
shaped like the benchmarks' ``extra_info``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
report = pytest.importorskip("report")


def _row(op, provider, median, layers, mode="decode", shape="m B8 ctx1024", **extra):
    return dict(op=op, provider=provider, median=median, copilot_layers=layers, mode=mode,
                shape=f"{shape} copilot={layers}L", dtype="bf16", **extra)  # fmt: skip


def test_coupling_verdict_compares_the_pair_with_both_models_alone():
    rows = [
        _row("e2e", "naive", 0.010, 0),  # the Pilot alone
        _row("e2e", "triton", 0.0165, 4), _row("e2e", "copilot_alone", 0.005, 4),  # 0.0165 / 0.015 = 1.10
        _row("e2e", "triton", 0.0150, 16), _row("e2e", "copilot_alone", 0.0050, 16),  # 0.015 / 0.015 = 1.00
        _row("e2e", "naive", 0.030, 16),  # the naive pair is not "ours"
    ]
    text = "\n".join(report.coupling_section(rows))
    assert "| 4 | triton | 10.00 | 5.00 | 16.50 | 1.100 (missed by 0.050) |" in text
    assert "| 16 | triton | 10.00 | 5.00 | 15.00 | 1.000 (met) |" in text
    assert report.coupling_section([r for r in rows if r["provider"] != "copilot_alone"]) == []


def test_decoding_loop_table_gives_ms_per_token_and_the_overhead_over_the_pilot_alone():
    shape = "llama B1 prompt128 new32"
    rows = [
        _row("generate", "eager", 0.64, 0, mode="greedy", shape=shape, new_tokens=32),
        _row("generate", "graph", 0.16, 0, mode="greedy", shape=shape, new_tokens=32),
        _row("generate", "eager", 1.28, 16, mode="greedy", shape=shape, new_tokens=32),
        _row("generate", "graph", 0.32, 16, mode="greedy", shape=shape, new_tokens=32),
    ]
    text = "\n".join(report.generate_section(rows))
    assert ("| batch | mode | copilot layers | eager ms/token (overhead) | graph ms/token (overhead) | eager / graph |"
            in text)  # fmt: skip
    assert "| 1 | greedy | 0 | 20.00 | 5.00 | 4.00x |" in text
    assert "| 1 | greedy | 16 | 40.00 (+100.0%) | 10.00 (+100.0%) | 4.00x |" in text
    # a GraphDecoder's reused graph: its own column and ratio
    rows += [_row("generate", "graph_reused", 0.08, 0, mode="greedy", shape=shape, new_tokens=32),
             _row("generate", "graph_reused", 0.16, 16, mode="greedy", shape=shape, new_tokens=32)]  # fmt: skip
    text = "\n".join(report.generate_section(rows))
    assert ("| graph ms/token (overhead) | graph_reused ms/token (overhead) | eager / graph | eager / graph reused |"
            in text)  # fmt: skip
    assert "| 1 | greedy | 16 | 40.00 (+100.0%) | 10.00 (+100.0%) | 5.00 (+100.0%) | 4.00x | 8.00x |" in text
    # beam search rows apart from the greedy ones, with their own Pilot-alone baseline
    rows += [_row("generate", "eager", 2.56, 0, mode="beam4", shape=shape, new_tokens=32),
             _row("generate", "eager", 3.84, 16, mode="beam4", shape=shape, new_tokens=32)]  # fmt: skip
    text = "\n".join(report.generate_section(rows))
    assert "| 1 | beam4 | 16 | 120.00 (+50.0%) | - | - | - | - |" in text
    # the batch a benchmark records wins over the shape text
    text = "\n".join(report.generate_section([_row("generate", "eager", 0.64, 0, mode="greedy", shape="llama new32",
                                                    new_tokens=32, batch=16)]))  # fmt: skip
    assert "| 16 | greedy | 0 | 20.00 |" in text


def test_the_eager_provider_is_the_baseline_where_a_group_has_no_naive_one():
    rows = [_row("generate", "eager", 0.6, 0, mode="greedy", new_tokens=32),
            _row("generate", "graph", 0.2, 0, mode="greedy", new_tokens=32)]  # fmt: skip
    groups = report.by_group(rows)
    text = "\n".join(report.op_section("generate", groups, None))
    assert "| eager | 600 |" in text and "| 1.00x |" in text  # the baseline against itself
    assert "| graph | 200 |" in text and "| 3.00x |" in text


def test_a_json_file_cut_short_is_skipped_with_a_note(tmp_path, capsys):
    # gpu_check.sh kills the benchmark stage 20 s after its deadline's SIGINT: a JSON file can be cut mid-write.
    good = tmp_path / "good.json"
    good.write_text('{"benchmarks": [{"name": "test_x", "extra_info": {}, "stats": {"median": 0.002}}]}')
    cut = tmp_path / "cut.json"
    cut.write_text('{"benchmarks": [{"name": "test_y", "extra_info": {"op": "log_att')
    out = tmp_path / "report.md"
    assert report.main([str(cut), str(good), "--out", str(out)]) == 0
    text = out.read_text()
    assert "not valid JSON, skipped" in text and "test_x" in text
    assert "skipping" in capsys.readouterr().out


def test_per_case_records_make_a_report_when_the_json_is_lost(tmp_path):
    # TCOPILOT_BENCH_JSONL: one pytest-benchmark record per finished case; a last line cut mid-write is dropped.
    rec = {"name": "test_x", "group": "g", "extra_info": {}, "stats": {"median": 0.002}}
    path = tmp_path / "cases.jsonl"
    path.write_text(json.dumps(rec) + "\n" + json.dumps({**rec, "name": "test_y"}) + "\n" + '{"name": "test_z", "st')
    rows, others, _ = report.load([path])
    assert rows == [] and [o["name"] for o in others] == ["test_x", "test_y"]
