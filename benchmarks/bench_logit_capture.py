"""Peak host memory of logit_capture's chunked PyTorch path against the materialising reference.

Run it with::

    pytest benchmarks/bench_logit_capture.py -s -m slow

(``-s`` shows the measured numbers; ``-m slow`` because the test takes about a minute on 2 CPU cores and the
project's default ``addopts`` deselect slow tests.)

Each implementation runs forward + backward once at N=4096, d=256, V=32000, fp32, ``values=None``, in a
fresh Python process, so allocator caches and earlier tests do not blur the numbers. The measure is the
growth of the process's peak resident set (``VmHWM``) over its resident set right after the inputs exist:
the peak is reset through ``/proc/self/clear_refs`` where the kernel allows it, else ``ru_maxrss`` is used
(which can only overstate the growth). One fp32 ``[N x V]`` tensor is 500 MiB here; the chunked path should
stay near its 16 MiB chunk plus the fp32 ``d weight`` accumulator, the reference holds several.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

N, D, V = 4096, 256, 32000

_SCRIPT = textwrap.dedent(
    """
    import json, os, resource, sys
    import torch
    from tcopilot.kernels.logit_capture import logit_capture, logit_capture_reference

    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def peak():
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def reset_peak():
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return True
        except OSError:
            return False

    which, n, d, v = sys.argv[1], *map(int, sys.argv[2:5])
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, d, generator=g).requires_grad_()
    weight = (torch.randn(v, d, generator=g) * d ** -0.5).requires_grad_()
    labels = torch.randint(0, v, (n,), generator=g)
    labels[::7] = -100
    fn = logit_capture_reference if which == "reference" else (
        lambda *a, **k: logit_capture(*a, impl="torch", **k))
    # A tiny warm-up loads kernels and thread pools, so their one-off memory is not charged to the run.
    w = weight[:64].detach().clone().requires_grad_()
    fn(hidden[:8].detach().clone().requires_grad_(), w, torch.zeros(8, dtype=torch.long)).loss.backward()
    del w
    base = rss()
    exact = reset_peak()
    cap = fn(hidden, weight, labels)
    cap.loss.backward()
    top = peak()
    print(json.dumps({"growth": top - base, "base": base, "exact_reset": exact, "loss": cap.loss.item()}))
    """
)


def measure(which: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", _SCRIPT, which, str(N), str(D), str(V)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    if out.returncode != 0:
        raise RuntimeError(f"{which} run failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_peak_memory_torch_vs_reference():
    torch_run = measure("torch")
    ref_run = measure("reference")
    mib = 1 << 20
    nv = N * V * 4 / mib
    print(
        f"\nlogit_capture fwd+bwd, N={N} d={D} V={V} fp32, values=None (one [N x V] fp32 = {nv:.0f} MiB)\n"
        f"  impl='torch': peak growth {torch_run['growth'] / mib:8.1f} MiB\n"
        f"  reference   : peak growth {ref_run['growth'] / mib:8.1f} MiB\n"
        f"  ratio {ref_run['growth'] / max(torch_run['growth'], 1):.1f}x, exact peak reset: "
        f"{torch_run['exact_reset'] and ref_run['exact_reset']}"
    )
    assert abs(torch_run["loss"] - ref_run["loss"]) < 1e-4 * max(1.0, abs(ref_run["loss"]))
    assert torch_run["growth"] <= ref_run["growth"] / 4
