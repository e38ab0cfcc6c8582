"""Speed of ``logit_capture`` (the Pilot's LM head + loss + Mistake Log statistics) against its peers.

Providers, side by side per (shape, values, dtype, mode):

* ``naive``: what a user writes: materialised logits ``h @ W.T``, ``F.cross_entropy`` on fp32 logits, the
  statistics from ``softmax`` and the Copilot's products ``p @ values`` as a separate GEMM;
* ``compile``: ``torch.compile`` of ``naive`` (GPU; CPU only with ``TCOPILOT_BENCH_COMPILE=1``);
* ``torch`` / ``triton``: ``tcopilot.logit_capture(impl=...)``;
* peers for the loss alone (``values=None`` only, they have no statistics): PyTorch's chunked
  ``F.linear_cross_entropy`` (``torch_lce``, where this torch has it), liger-kernel's fused linear
  cross-entropy (``liger``) and cut-cross-entropy (``cce``), when importable (GPU).

Modes: ``fwd`` (training forward: inputs require grad) and ``fwd_bwd`` (forward + backward of
``loss + sum(p_values * G)`` with a fixed random ``G``, so the backward also produces ``d values``).

Work model: ``2 N d V`` forward and ``6 N d V`` forward + backward (the model flops; an implementation that
recomputes the logits in the backward does ``8 N d V``), plus ``2 N V k`` forward and ``4 N V k`` in total
for ``p @ values`` with ``k = 2c + 1`` columns.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from benchutil import (
    DEVICE,
    OneSlot,
    assert_close,
    case,
    compile_status,
    dtype_name,
    import_optional,
    need_compile,
    need_triton,
    release,
    require_memory,
    run_bench,
    set_group,
    timed_first_call,
    zero_grads,
)

from tcopilot import logit_capture, logit_capture_reference

IGNORE = -100


@dataclass(frozen=True)
class Shape:
    n: int
    d: int
    vocab: int
    c: int  # Copilot width: values have 2c + 1 columns
    dtype: torch.dtype

    @property
    def id(self) -> str:
        return f"N{self.n}-d{self.d}-V{self.vocab}"


CPU_SHAPES = [Shape(256, 64, 2000, 16, torch.float32)]
GPU_SHAPES = [
    Shape(8192, 4096, 128256, 2048, torch.bfloat16),
    Shape(8192, 2048, 128256, 2048, torch.bfloat16),
]
GPU_FULL_ONLY = {GPU_SHAPES[1]}
# Providers run on a GPU in the full scope only: our PyTorch path (no issue target there: its fp32 chunks take
# ~25 s per shape on an H200) and torch.compile of the naive path (cold compiles of minutes; the quick scope
# of gpu_check.sh keeps its few minutes for the kernels against their peers).
GPU_FULL_ONLY_PROVIDERS = {"torch", "compile"}
VALUES = ["none", "copilot"]
MODES = ["fwd", "fwd_bwd"]
PROVIDERS = ["naive", "torch", "triton", "torch_lce", "liger", "cce", "compile"]
LOSS_ONLY = {"torch_lce", "liger", "cce"}  # peers that compute the loss alone


def _cases():
    out = []
    for gpu, shapes in ((False, CPU_SHAPES), (True, GPU_SHAPES)):
        for shape in shapes:
            for vals in VALUES:
                for mode in MODES:
                    for prov in PROVIDERS:
                        if vals != "none" and prov in LOSS_ONLY:
                            continue
                        cid = f"{shape.id}-{dtype_name(shape.dtype)}-vals_{vals}-{mode}-{prov}"
                        full = gpu and (shape in GPU_FULL_ONLY or prov in GPU_FULL_ONLY_PROVIDERS)
                        out.append(case((shape, vals, mode, prov), id=cid, gpu=gpu, full=full, provider=prov))
    return out


# ----------------------------------------------------------------------------------------------- inputs


@dataclass
class Inputs:
    hidden: torch.Tensor
    weight: torch.Tensor
    labels: torch.Tensor
    values: torch.Tensor | None
    grad_pv: torch.Tensor | None  # G: the upstream gradient of p_values

    def leaves(self):
        return [self.hidden, self.weight, self.values]


def make_inputs(shape: Shape, vals: str) -> Inputs:
    g = torch.Generator(device=DEVICE).manual_seed(0)
    kw = dict(device=DEVICE, generator=g)
    hidden = torch.randn(shape.n, shape.d, **kw).to(shape.dtype).requires_grad_()
    # Logits with a standard deviation of 2: a spread-out softmax over the whole vocabulary (random inputs;
    # none of the providers here skips work on sparse probabilities).
    weight = (torch.randn(shape.vocab, shape.d, **kw) * (2.0 / shape.d**0.5)).to(shape.dtype).requires_grad_()
    labels = torch.randint(0, shape.vocab, (shape.n,), **kw)
    labels[::8] = IGNORE
    values = grad_pv = None
    if vals == "copilot":
        k = 2 * shape.c + 1
        values = (torch.randn(shape.vocab, k, **kw) * 0.02).to(shape.dtype).requires_grad_()
        grad_pv = torch.randn(shape.n, k, **kw)
    return Inputs(hidden, weight, labels, values, grad_pv)


def total_loss(loss: torch.Tensor, p_values: torch.Tensor | None, inp: Inputs) -> torch.Tensor:
    if p_values is None:
        return loss
    return loss + (p_values * inp.grad_pv).sum()


@dataclass
class Result:
    loss: torch.Tensor
    lse: torch.Tensor | None = None
    p_target: torch.Tensor | None = None
    p_sq_sum: torch.Tensor | None = None
    p_values: torch.Tensor | None = None


def reference(shape: Shape, vals: str, inp: Inputs) -> tuple[Result, list]:
    """fp32 reference outputs and the gradients of ``total_loss`` (hidden, weight, values)."""
    h, w, v = (t.detach().float().requires_grad_() if t is not None else None for t in inp.leaves())
    cap = logit_capture_reference(h, w, inp.labels, v, ignore_index=IGNORE)
    total_loss(cap.loss, cap.p_values, inp).backward()
    res = Result(cap.loss.detach(), cap.lse, cap.p_target, cap.p_sq_sum,
                 None if cap.p_values is None else cap.p_values.detach())
    return res, [h.grad, w.grad, None if v is None else v.grad]


# -------------------------------------------------------------------------------------------- providers


def naive_capture(hidden, weight, labels, values):
    """The plain-PyTorch capture: every [N, V] tensor materialised."""
    logits = hidden @ weight.T  # [N, V] in the input dtype, as an eager LM head
    zf = logits.float()
    loss = F.cross_entropy(zf, labels, ignore_index=IGNORE)
    with torch.no_grad():  # the Mistake Log is detached from the Pilot
        lse = torch.logsumexp(zf, dim=-1)
        p = torch.exp(zf - lse[:, None])
        counted = labels != IGNORE
        p_target = torch.where(counted, p.gather(1, labels.clamp(min=0)[:, None]).squeeze(1), 0.0)
        p_sq_sum = (p * p).sum(-1)
    p_values = None
    if values is not None:
        p_values = (p.to(values.dtype) @ values).float()  # a tensor-core GEMM in the values' dtype
    return loss, lse, p_target, p_sq_sum, p_values


_compiled_naive = None


def _provider_fn(prov: str, inp: Inputs):
    """A function returning a :class:`Result` for one forward of ``prov``."""
    h, w, y, v = inp.hidden, inp.weight, inp.labels, inp.values
    if prov == "naive":
        return lambda: Result(*naive_capture(h, w, y, v))
    if prov == "compile":
        global _compiled_naive
        need_compile()
        if _compiled_naive is None:
            _compiled_naive = torch.compile(naive_capture)
        return lambda: Result(*_compiled_naive(h, w, y, v))
    if prov in ("torch", "triton"):
        if prov == "triton":
            need_triton("logit_capture")

        def run():
            cap = logit_capture(h, w, y, v, ignore_index=IGNORE, impl=prov)
            return Result(cap.loss, cap.lse, cap.p_target, cap.p_sq_sum, cap.p_values)

        return run
    if prov == "torch_lce":
        if not hasattr(F, "linear_cross_entropy") or not hasattr(torch.nn, "LinearCrossEntropyOptions"):
            pytest.skip(f"torch {torch.__version__} has no chunked F.linear_cross_entropy")
        opts = torch.nn.LinearCrossEntropyOptions()
        return lambda: Result(F.linear_cross_entropy(h, w, y, ignore_index=IGNORE, options=opts))
    if prov == "liger":
        if DEVICE.type != "cuda":
            pytest.skip("liger-kernel runs on CUDA only")
        mod = import_optional("liger_kernel.transformers", "liger-kernel")
        loss_fn = mod.LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE)
        return lambda: Result(loss_fn(w, h, y))
    if prov == "cce":
        if DEVICE.type != "cuda":
            pytest.skip("cut-cross-entropy's kernels run on CUDA only")
        mod = import_optional("cut_cross_entropy", "cut-cross-entropy")
        return lambda: Result(mod.linear_cross_entropy(h, w, y, ignore_index=IGNORE))
    raise ValueError(prov)


def _check(prov: str, shape: Shape, got: Result, ref: Result, grads: list | None, ref_grads: list) -> None:
    dt = shape.dtype
    assert_close(f"{prov} loss", got.loss, ref.loss, dt)
    if prov not in LOSS_ONLY:
        assert_close(f"{prov} lse", got.lse, ref.lse, dt)
        assert_close(f"{prov} p_target", got.p_target, ref.p_target, dt)
        assert_close(f"{prov} p_sq_sum", got.p_sq_sum, ref.p_sq_sum, dt)
        assert_close(f"{prov} p_values", got.p_values, ref.p_values, dt)
    if grads is not None:
        for name, g, rg in zip(("d hidden", "d weight", "d values"), grads, ref_grads):
            assert_close(f"{prov} {name}", g, rg, dt)


INPUTS = OneSlot()
REFS = OneSlot()



@pytest.fixture(autouse=True, scope="module")
def _release_module_state():
    yield
    release(INPUTS, REFS)


@pytest.mark.parametrize(("shape", "vals", "mode", "provider"), _cases())
def test_logit_capture_speed(benchmark, shape: Shape, vals: str, mode: str, provider: str):
    if provider == "compile" and compile_status():
        pytest.skip(compile_status())
    nv = shape.n * shape.vocab
    if provider in ("naive", "compile"):
        # logits in the input dtype, fp32 logits, p, log-softmax and their gradients
        require_memory(nv * (2 + 4 * (3 if mode == "fwd" else 6)), f"{provider} [N x V] tensors")
    inp = INPUTS.get((shape, vals), lambda: make_inputs(shape, vals))
    require_memory(nv * 4 * 4, "fp32 reference")
    ref, ref_grads = REFS.get((shape, vals), lambda: reference(shape, vals, inp))
    forward = _provider_fn(provider, inp)
    leaves = inp.leaves()

    def step():
        res = forward()
        if mode == "fwd_bwd":
            total_loss(res.loss, res.p_values, inp).backward()
        return res

    # Correctness first, untimed (this call also compiles / autotunes).
    zero_grads(leaves)
    got, _ = timed_first_call(step, provider) if provider == "compile" else (step(), 0.0)
    grads = [t.grad if t is not None else None for t in leaves] if mode == "fwd_bwd" else None
    _check(provider, shape, got, ref, grads, ref_grads)
    del got, grads

    k = 0 if inp.values is None else inp.values.shape[1]
    ndv, nvk = shape.n * shape.d * shape.vocab, shape.n * shape.vocab * k
    flops = 2 * ndv + 2 * nvk if mode == "fwd" else 6 * ndv + 4 * nvk
    set_group(benchmark, "logit_capture", f"{shape.id} k={k}", shape.dtype, mode, provider,
              n=shape.n, d=shape.d, vocab=shape.vocab, k=k)
    run_bench(benchmark, step, setup=lambda: zero_grads(leaves), flops=flops, bound="compute")
