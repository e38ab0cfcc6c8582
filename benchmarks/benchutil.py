"""Shared helpers of the benchmark suite: device, shapes, providers, timing, memory, checks.

The ``bench_*.py`` files import this module; ``conftest.py`` holds the pytest hooks (collection of
``bench_*.py``, markers, ordering, the session header). The helpers live here rather than in
``conftest.py`` because a test module cannot import a conftest reliably (several ``conftest`` modules
exist in one session when ``tests/`` and ``benchmarks/`` are collected together).

Conventions every benchmark follows:

* Inputs are built once per shape (seeded), the provider's result is checked against the op's
  reference once, untimed, and then :func:`run_bench` times the step in pytest-benchmark's pedantic
  mode, with ``torch.cuda.synchronize()`` inside the timed function.
* ``benchmark.extra_info`` carries what ``report.py`` needs: ``op``, ``shape``, ``dtype``, ``mode``,
  ``provider``, the flop or byte model (``flops``, ``bytes``, ``bound``), the derived ``tflops`` / ``gbps``,
  peak memory, device name and versions.
* GPU shapes are skipped on CPU hosts (and the tiny CPU shapes on GPU hosts) with a reason; providers that
  cannot run here (``triton`` without CUDA, liger-kernel / cut-cross-entropy not installed, ...) skip with a
  reason as well.

Environment variables:

``TCOPILOT_BENCH_SCOPE``  ``full`` (default) or ``quick``: ``quick`` skips the shapes marked full-only
                          (``gpu_check.sh`` uses it to fit its time budget).
``TCOPILOT_BENCH_COMPILE`` ``1``: include the ``torch.compile`` providers on CPU (off by default there: a cold
                          compile took about 70 s on the 2-core development machines); ``0``: skip them
                          everywhere.
``TCOPILOT_BENCH_ROUNDS`` / ``TCOPILOT_BENCH_WARMUP``: fix the timed and warm-up rounds (otherwise slow
                          cases get fewer rounds, down to 3, so each takes about ``TCOPILOT_BENCH_TARGET_S``:
                          1 s on GPU, 0.3 s on CPU).
``TCOPILOT_PROFILE``      ``1`` (or pytest's ``--profile``): after timing, run one more step under
                          ``torch.profiler`` and write a Chrome trace and a per-kernel table to the results folder.
``TCOPILOT_RESULTS_DIR``  where profiles go (default ``benchmarks/results``).
``TCOPILOT_BENCH_JSONL``  a file that every finished case appends its pytest-benchmark record to, one JSON line
                          each (``conftest.py``): what survives a run killed before pytest writes its
                          ``--benchmark-json`` (``gpu_check.sh`` sets it; ``report.py`` reads it).
"""

from __future__ import annotations

import functools
import gc
import importlib
import math
import os
import platform
import re
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import pytest
import torch

# ----------------------------------------------------------------------------------------------- device

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ON_GPU = DEVICE.type == "cuda"
SCOPE = os.environ.get("TCOPILOT_BENCH_SCOPE", "full")
COMPILE_ENV = os.environ.get("TCOPILOT_BENCH_COMPILE", "")
PROFILE = os.environ.get("TCOPILOT_PROFILE", "0") == "1"
RESULTS_DIR = Path(os.environ.get("TCOPILOT_RESULTS_DIR", Path(__file__).resolve().parent / "results"))

# A cold torch.compile of one op took about 70 s on the 2-core CPU machines (measured), above the 60 s the
# CPU run may spend on it, so compile is opt-in there. When enabled, a first call slower than this skips.
CPU_COMPILE_LIMIT_S = 60.0

# Providers whose first call compiles for a long time: run after everything else (conftest reorders them),
# so that a time-limited GPU run loses these first.
LATE_PROVIDERS = frozenset({"compile", "flex"})


def sync() -> None:
    """Wait for the GPU (no-op on CPU): every timed function ends with this."""
    if ON_GPU:
        torch.cuda.synchronize()


@functools.cache
def env_info() -> dict:
    """Device name and versions, stored in every benchmark's ``extra_info``."""
    info = {
        "device": DEVICE.type,
        "device_name": torch.cuda.get_device_name() if ON_GPU else platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda or "",
        "python": platform.python_version(),
        "scope": SCOPE,
        # log_attention's training kernels: autotuned (the default) or each kernel's table entry
        "autotune": os.environ.get("TCOPILOT_AUTOTUNE", "1") != "0",
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = ""
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        info["transformers"] = ""
    if not ON_GPU:
        info["cpu_threads"] = torch.get_num_threads()
    return info


# ----------------------------------------------------------------------------------------------- shapes

gpu_only = pytest.mark.skipif(not ON_GPU, reason="GPU shape: needs CUDA (this host has none)")
cpu_only = pytest.mark.skipif(ON_GPU, reason="tiny CPU shape: a CUDA host runs the GPU shapes instead")
full_only = pytest.mark.skipif(SCOPE == "quick", reason="full-scope shape (TCOPILOT_BENCH_SCOPE=quick)")
late = pytest.mark.bench_late  # long first call (compilation): conftest runs these last


def case(values: tuple, *, id: str, gpu: bool, full: bool = False, provider: str | None = None):
    """A ``pytest.param`` for one benchmark case with the device / scope / ordering marks it needs."""
    marks = [gpu_only if gpu else cpu_only]
    if full:
        marks.append(full_only)
    if provider in LATE_PROVIDERS:
        marks.append(late)
    return pytest.param(*values, id=id, marks=marks)


_DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}


def dtype_name(dtype: torch.dtype) -> str:
    return _DTYPE_NAMES[dtype]


class OneSlot:
    """Keeps the value of the most recent key only (inputs or reference results of the current shape), so a
    run over many GPU shapes never holds more than one shape's tensors."""

    def __init__(self):
        self.key = None
        self.value = None

    def get(self, key, factory: Callable):
        if key != self.key:
            self.key, self.value = None, None
            free_memory()
            self.value = factory()
            self.key = key
        return self.value


def release(*slots: OneSlot) -> None:
    """Drop what the slots hold (a bench module's autouse fixture does this when the module is done, so the
    models and inputs of one file do not inflate the next file's peak memory)."""
    for slot in slots:
        slot.key, slot.value = None, None
    free_memory()


def free_memory() -> None:
    gc.collect()
    if ON_GPU:
        torch.cuda.empty_cache()


def require_memory(nbytes: float, what: str) -> None:
    """Skip when an estimated working set would not fit in 80% of the GPU's free memory."""
    if not ON_GPU:
        return
    free_memory()
    free, _ = torch.cuda.mem_get_info()
    if nbytes > 0.8 * free:
        pytest.skip(f"{what}: needs about {nbytes / 2**30:.0f} GiB, {free / 2**30:.0f} GiB free")


# -------------------------------------------------------------------------------------------- providers

_TRITON_MODULES = {
    "logit_capture": "tcopilot.kernels.logit_capture.triton_impl",
    "log_attention": "tcopilot.kernels.log_attention.triton_impl",
    "rectified_next_token": "tcopilot.kernels.rectified_next_token.triton_impl",
    "rectified_decode_head": "tcopilot.kernels.rectified_decode_head.triton_impl",
}


@functools.cache
def triton_status(op: str) -> str | None:
    """``None`` when our Triton kernel for ``op`` can run here, else the reason why not."""
    if not ON_GPU:
        return "our Triton kernels are benchmarked on CUDA only (the CPU interpreter is not a timing target)"
    try:
        importlib.import_module(_TRITON_MODULES[op])
    except ModuleNotFoundError as err:
        if err.name == _TRITON_MODULES[op]:
            return f"no Triton kernel for {op} in this build yet"
        return f"Triton kernel for {op} not importable: {err}"
    except Exception as err:  # a kernel module that fails to import must not stop the other benchmarks
        return f"Triton kernel for {op} not importable: {type(err).__name__}: {err}"
    return None


def need_triton(op: str) -> None:
    reason = triton_status(op)
    if reason:
        pytest.skip(reason)


def compile_status() -> str | None:
    """``None`` when the torch.compile providers should run here, else the reason why not."""
    if COMPILE_ENV == "0":
        return "torch.compile providers disabled (TCOPILOT_BENCH_COMPILE=0)"
    if not ON_GPU and COMPILE_ENV != "1":
        return (
            "torch.compile on CPU is opt-in (a cold compile took ~70 s here, over the 60 s budget); "
            "set TCOPILOT_BENCH_COMPILE=1"
        )
    return None


def need_compile() -> None:
    reason = compile_status()
    if reason:
        pytest.skip(reason)


def timed_first_call(fn: Callable, what: str):
    """Run ``fn`` once (it compiles); on CPU skip when that took longer than ``CPU_COMPILE_LIMIT_S``."""
    t0 = time.perf_counter()
    out = fn()
    sync()
    took = time.perf_counter() - t0
    if not ON_GPU and took > CPU_COMPILE_LIMIT_S:
        pytest.skip(f"{what}: first call (compilation) took {took:.0f} s, over {CPU_COMPILE_LIMIT_S:.0f} s")
    return out, took


def import_optional(module: str, what: str):
    """Import an optional peer (liger-kernel, cut-cross-entropy, ...) or skip with a reason."""
    try:
        return importlib.import_module(module)
    except Exception as err:
        pytest.skip(f"{what} not importable here ({type(err).__name__}: {err})")


# ----------------------------------------------------------------------------------------------- checks

# Allowed max |got - ref| / max |ref| per dtype of the benchmarked inputs (the reference is fp32, or
# fp64 where noted). bf16 keeps 8 bits of mantissa: sums over 10^5 terms rounded once lose ~1e-2.
CHECK_TOL = {torch.float32: 2e-4, torch.float64: 1e-8, torch.float16: 1e-2, torch.bfloat16: 5e-2}


def max_rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    got = got.detach().double()
    ref = ref.detach().to(got.device).double()
    scale = ref.abs().max().clamp(min=1e-6)
    return float((got - ref).abs().max() / scale)


def assert_close(what: str, got: torch.Tensor | None, ref: torch.Tensor | None, dtype: torch.dtype,
                 tol: float | None = None) -> None:
    """Check a benchmark's result against the reference (scalars: relative to max(|ref|, 1))."""
    if ref is None:
        return
    assert got is not None, f"{what}: provider returned None, reference has a value"
    assert got.shape == ref.shape, f"{what}: shape {tuple(got.shape)} != reference {tuple(ref.shape)}"
    tol = CHECK_TOL[dtype] if tol is None else tol
    got, ref = got.detach(), ref.detach()
    if got.dim() == 0:
        err = abs(float(got) - float(ref)) / max(abs(float(ref)), 1.0)
    else:
        err = max_rel_err(got, ref)
    assert err <= tol, f"{what}: error {err:.2e} against the reference exceeds {tol:.0e}"


# ----------------------------------------------------------------------------------------------- memory


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _hwm_bytes() -> int | None:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return None


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def measure_memory(fn: Callable, prepare: Callable) -> dict:
    """Peak memory of one untimed call of ``fn``.

    CUDA: ``torch.cuda.max_memory_allocated`` (``peak_mem_mb``, absolute, inputs included) and its growth
    over the memory allocated before the call (``mem_growth_mb``). CPU: the growth of the process's peak
    resident set (``VmHWM``, reset through ``/proc/self/clear_refs``) over its resident set before the call;
    approximate, since the allocator reuses cached memory; ``None`` where the kernel does not allow the reset.
    """
    prepare()
    free_memory()
    if ON_GPU:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        took = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated()
        return {
            "peak_mem_mb": peak / 2**20,
            "mem_growth_mb": (peak - base) / 2**20,
            "mem_method": "cuda.max_memory_allocated",
            "probe_s": took,
        }
    try:
        base = _rss_bytes()
        reset = _reset_hwm()
    except OSError:
        base, reset = 0, False
    t0 = time.perf_counter()
    fn()
    took = time.perf_counter() - t0
    if not reset:
        return {"peak_mem_mb": None, "mem_growth_mb": None, "mem_method": "none (no /proc reset)", "probe_s": took}
    hwm = _hwm_bytes()
    return {
        "peak_mem_mb": None,
        "mem_growth_mb": max(0, hwm - base) / 2**20 if hwm is not None else None,
        "mem_method": "rss_hwm (approximate)",
        "probe_s": took,
    }


# ----------------------------------------------------------------------------------------------- timing

DEFAULT_ROUNDS = int(os.environ.get("TCOPILOT_BENCH_ROUNDS", 10 if ON_GPU else 5))
# On CPU the untimed check and memory calls before timing are warm-up enough (no JIT, no autotuning).
DEFAULT_WARMUP = int(os.environ.get("TCOPILOT_BENCH_WARMUP", 3 if ON_GPU else 0))
# Rounds are cut so that one benchmark's timed rounds take about this long (at least MIN_ROUNDS rounds):
# slow cases (a 1B training step, the naive reference at GPU shapes) would otherwise eat the time budget.
TARGET_S = float(os.environ.get("TCOPILOT_BENCH_TARGET_S", 1.0 if ON_GPU else 0.3))
MIN_ROUNDS = 3


def set_group(benchmark, op: str, shape: str, dtype: torch.dtype, mode: str, provider: str, **info) -> None:
    """One pytest-benchmark group per (op, shape, dtype, mode): the providers side by side."""
    benchmark.group = f"{op} {shape} {dtype_name(dtype)} {mode}"
    benchmark.extra_info.update(env_info())
    benchmark.extra_info.update(
        op=op, shape=shape, dtype=dtype_name(dtype), mode=mode, provider=provider, **info
    )


def run_bench(
    benchmark,
    fn: Callable[[], object],
    *,
    rounds: int | None = None,
    warmup: int | None = None,
    setup: Callable[[], object] | None = None,
    flops: float | None = None,
    nbytes: float | None = None,
    bound: str | None = None,
    memory: bool = True,
) -> None:
    """Time ``fn`` with ``benchmark.pedantic`` and record throughput and peak memory.

    ``fn`` does one step (its result is dropped); ``setup`` runs untimed before every round (clear grads,
    restore caches). The timed function synchronises the GPU before returning, and so does the setup, so a
    round measures exactly the step's work. Warm-up rounds absorb Triton JIT and autotuning (the untimed
    correctness check before this call has usually compiled everything already).

    ``flops`` / ``nbytes``: the explicit work model of one step; ``bound`` (``"compute"`` or ``"memory"``)
    says which ceiling ``report.py`` compares it with.
    """
    rounds = rounds or DEFAULT_ROUNDS
    warmup = DEFAULT_WARMUP if warmup is None else warmup

    def prepare():
        if setup is not None:
            setup()
        sync()

    def timed():
        fn()
        sync()

    extra = benchmark.extra_info
    extra.update(flops=flops, bytes=nbytes, bound=bound or ("compute" if flops else "memory"))
    if memory:
        extra.update(measure_memory(timed, prepare))
    else:
        prepare()
        t0 = time.perf_counter()
        timed()
        extra["probe_s"] = time.perf_counter() - t0
    if "TCOPILOT_BENCH_ROUNDS" not in os.environ:
        rounds = max(MIN_ROUNDS, min(rounds, math.ceil(TARGET_S / max(extra["probe_s"], 1e-6))))
        warmup = min(warmup, max(1, rounds // 2))
    benchmark.pedantic(timed, setup=prepare, rounds=rounds, warmup_rounds=warmup, iterations=1)
    stats = getattr(benchmark, "stats", None)
    if stats is not None:  # None under --benchmark-disable
        median = stats.stats.median
        extra["median_s"] = median
        if flops:
            extra["tflops"] = flops / median / 1e12
        if nbytes:
            extra["gbps"] = nbytes / median / 1e9
    if PROFILE:
        profile_step(benchmark.name, timed, prepare)


def profile_step(name: str, fn: Callable, prepare: Callable) -> Path:
    """One step under ``torch.profiler``: a Chrome trace and a per-kernel table in the results folder."""
    from torch.profiler import ProfilerActivity, profile

    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    stem = RESULTS_DIR / ("profile-" + re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_"))
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if ON_GPU else [])
    prepare()
    with profile(activities=activities, record_shapes=True) as prof:
        fn()
    prof.export_chrome_trace(str(stem) + ".json")
    sort_by = "self_device_time_total" if ON_GPU else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=sort_by, row_limit=60, max_name_column_width=90)
    header = f"{name}\ndevice: {env_info()['device_name']}, torch {torch.__version__}, by {sort_by}\n\n"
    (Path(str(stem) + ".txt")).write_text(header + table + "\n")
    return stem


# ------------------------------------------------------------------------------------------------- misc


def zero_grads(tensors: Iterable[torch.Tensor | None]) -> None:
    for t in tensors:
        if t is not None:
            t.grad = None


def seeded(seed: int) -> torch.Generator:
    return torch.Generator(device=DEVICE).manual_seed(seed)
