"""Measure the two ceilings the report compares against: a large copy (GB/s) and a large matmul (TFLOP/s).

Usage::

    python benchmarks/ceilings.py --out ceilings.json

CUDA: a device-to-device copy of 1 GiB (bytes counted = read + write) and a bf16 8192^3 matmul; CPU (for
trying the report locally): a 256 MiB copy and a fp32 2048^3 matmul. Each is timed over several
repetitions after a warm-up; the median is kept (CUDA events on GPU, ``perf_counter`` on CPU).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch


def _time(fn, reps: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        times = []
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        return statistics.median(times)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _time_copy(mib: int, device: torch.device, gpu: bool) -> float:
    src = torch.empty(mib * 2**20, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    return _time(lambda: dst.copy_(src), reps=20 if gpu else 5, warmup=3 if gpu else 1)


def _time_matmul(n: int, dtype: torch.dtype, device: torch.device, gpu: bool) -> float:
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    return _time(lambda: a @ b, reps=30 if gpu else 3, warmup=5 if gpu else 1)


def measure(copy_mib: int | None = None, matmul_n: int | None = None) -> dict:
    gpu = torch.cuda.is_available()
    device = torch.device("cuda" if gpu else "cpu")
    copy_mib = copy_mib or (1024 if gpu else 256)
    matmul_n = matmul_n or (8192 if gpu else 2048)
    dtype = torch.bfloat16 if gpu else torch.float32

    t_copy = _time_copy(copy_mib, device, gpu)
    t_mm = _time_matmul(matmul_n, dtype, device, gpu)

    return {
        "device_name": torch.cuda.get_device_name() if gpu else "cpu",
        "copy_gbps": 2 * copy_mib * 2**20 / t_copy / 1e9,
        "copy_desc": f"{copy_mib} MiB device copy, read + write counted, median of repetitions",
        "matmul_tflops": 2 * matmul_n**3 / t_mm / 1e12,
        "matmul_desc": f"{str(dtype).replace('torch.', '')} {matmul_n}^3 torch.matmul, median",
        "torch": torch.__version__,
        "cuda": torch.version.cuda or "",
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Measure copy and matmul ceilings for report.py")
    ap.add_argument("--out", type=Path, default=Path("ceilings.json"))
    ap.add_argument("--copy-mib", type=int)
    ap.add_argument("--matmul-n", type=int)
    args = ap.parse_args(argv)
    result = measure(args.copy_mib, args.matmul_n)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
