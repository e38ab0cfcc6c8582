"""Every Triton kernel compiles for sm_90 (H100/H200) and fits in its shared memory, without a GPU.

The other kernel tests run under ``TRITON_INTERPRET=1``, which never lowers a kernel to a real target: a
kernel that fails in the NVIDIA pipeline or needs more than 227 KiB of shared memory would only show up on
a lent GPU. This compiles one representative configuration of each kernel (``benchmarks/sm90_compile.py
--quick``) with Triton's bundled ptxas. It runs in a subprocess because this process imported the kernels
as interpreted functions. 20-25 s on 2 cores: CI runs it, since it is the only check of the real GPU
pipeline a CPU-only CI has; the full table is ``python benchmarks/sm90_compile.py``
(``benchmarks/results/sm90-compile.md``).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "sm90_compile.py"
# One representative configuration of each of these must be compiled: a kernel dropped from the script's
# tables would otherwise pass unnoticed.
KERNELS = {
    "log_attention_fwd",
    "log_attention_decode",
    "log_attention_decode_combine",
    "log_attention_bwd_preprocess",
    "log_attention_bwd_dkdv",
    "log_attention_bwd_dq",
    "logit_capture_fwd",
    "logit_capture_bwd",
    "rectified_next_token",
    "rectified_decode_head",
}


def _script():
    if "sm90_compile" in sys.modules:
        return sys.modules["sm90_compile"]
    spec = importlib.util.spec_from_file_location("sm90_compile", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["sm90_compile"] = mod  # its dataclasses look their module up there
    spec.loader.exec_module(mod)  # imports no kernel module: those are imported when cases are built
    return mod


def test_sm90_compile_quick(tmp_path):
    pytest.importorskip("triton")
    sm90 = _script()
    if sm90.ptxas_path() is None:
        pytest.skip("no ptxas for sm_90 (Triton's NVIDIA backend is missing or incomplete)")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")  # fresh: a cache hit would skip ptxas and its report
    out_json = tmp_path / "rows.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--out", str(tmp_path / "sm90.md"), "--json", str(out_json)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert out_json.exists(), f"sm90_compile.py wrote no rows (exit {proc.returncode}):\n{proc.stderr[-4000:]}"
    rows = json.loads(out_json.read_text())
    bad = [f"{r['kernel']} {r['dtype']} {r['config']}: {r['error']}" for r in rows if r["status"] != "OK"]
    assert not bad, "sm_90 compile failures:\n" + "\n".join(bad)
    assert KERNELS <= {r["kernel"] for r in rows}, f"kernels not compiled: {KERNELS - {r['kernel'] for r in rows}}"
    for r in rows:
        assert r["shared"] <= sm90.SHARED_LIMIT, r
        assert r["regs"] is not None, f"no ptxas register report for {r['kernel']} {r['config']}"
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
