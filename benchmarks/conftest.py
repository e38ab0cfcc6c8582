"""pytest hooks of the benchmark suite (the helpers themselves are in ``benchutil.py``).

* Collects ``bench_*.py`` files, so ``pytest benchmarks/ --benchmark-only`` finds them while the project's
  ``testpaths = ["tests"]`` keeps a plain ``pytest`` from running benchmarks.
* Registers the ``bench_late`` marker and moves those cases (``torch.compile``, FlexAttention: long first
  calls) after all others, so a time-limited GPU run (``gpu_check.sh``) loses them first.
* Prints the device, versions and scope in the session header.
* ``--profile``: the kernel-profile mode, the same as ``TCOPILOT_PROFILE=1`` (``benchutil.py``).
* ``TCOPILOT_BENCH_JSONL=path``: each finished case's record is appended to ``path`` as one JSON line at once,
  so a run killed before pytest-benchmark writes its JSON at the session's end still leaves its results.
* After collection, every object that exists (modules, functions, classes of torch, transformers, triton, ...)
  is frozen out of the cyclic garbage collector: ``benchutil.free_memory`` collects before every shape and
  memory probe, and a full collection over those ~360k objects took 0.2 s each time, several times per case.
"""

from __future__ import annotations

import gc
import json
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `import benchutil` from every bench file

import benchutil  # noqa: E402


def pytest_addoption(parser):
    parser.addoption(
        "--profile", action="store_true", default=False,
        help="tcopilot benchmarks: after timing each case, run one more step under torch.profiler and write a "
             "Chrome trace and a per-kernel table to the results folder (same as TCOPILOT_PROFILE=1)",
    )  # fmt: skip


def pytest_configure(config):
    if config.getoption("--profile", default=False):
        benchutil.PROFILE = True
    config.addinivalue_line(
        "markers", "bench_late: benchmark case with a long first call (compilation); runs after the others"
    )


def pytest_collect_file(file_path: Path, parent):
    # Files given explicitly on the command line are collected by pytest itself (whatever their name);
    # collecting them here as well would run them twice.
    if (
        file_path.suffix == ".py"
        and file_path.name.startswith("bench_")
        and not parent.session.isinitpath(file_path)
    ):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def pytest_collection_modifyitems(session, config, items):
    # A stable sort: everything keeps its order except that bench_late cases move to the end.
    items.sort(key=lambda item: item.get_closest_marker("bench_late") is not None)


def pytest_collection_finish(session):
    # Nothing imported so far is garbage: moving it to the permanent generation makes every later
    # gc.collect() scan only what the benchmarks themselves create (models, inputs, autograd graphs).
    gc.collect()
    gc.freeze()


def pytest_unconfigure(config):
    # Frozen objects are never finalised at exit, and triton's bindings print leak warnings about them.
    gc.unfreeze()


def pytest_report_header(config):
    info = benchutil.env_info()
    return (
        f"tcopilot benchmarks: device {info['device']} ({info['device_name']}), torch {info['torch']}, "
        f"triton {info['triton'] or '-'}, cuda {info['cuda'] or '-'}, scope {info['scope']}"
    )


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    yield
    path = os.environ.get("TCOPILOT_BENCH_JSONL")
    if not path or call.when != "call":
        return
    fixture = getattr(item, "funcargs", {}).get("benchmark")
    stats = getattr(fixture, "stats", None)  # None: skipped, or failed before timing anything
    if stats is None:
        return
    record = stats.as_dict(include_data=False)  # the shape of one entry of --benchmark-json's "benchmarks"
    with open(path, "a") as f:
        f.write(json.dumps(record, default=str) + "\n")
