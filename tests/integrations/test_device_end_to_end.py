"""The whole pipeline a user runs, on each device: a training step, the Mistake Log, generate() and the Trainer.

Each test is one function of ``device``, run twice: ``cpu`` (in CI) and ``cuda`` (marked ``gpu``; run by
``benchmarks/gpu_check.sh`` on a lent GPU). The "fast" path is what a user gets by default on that device:
``impl="auto"`` on CUDA, i.e. the Triton kernels (logit_capture, log_attention, rectified_decode_head); on the CPU
the same kernels forced with ``impl="triton"`` in Triton's interpreter (tests/conftest.py sets
``TRITON_INTERPRET=1`` when there is no GPU). It is compared with ``impl="torch"`` on the same device, so both
variants run the same code and differ only in where the tensors live (and dtype in the bf16 test). The
``kernels`` fixture counts the calls into each Triton entry point, so a test fails if the fast path silently
stopped using Triton (or the reference started to).

Numerics of the fast path in fp32 (what the tolerances below allow for):

- logit_capture: its GEMMs are torch.mm / addmm (cuBLAS on CUDA, which in fp32 uses TF32 only if
  ``torch.backends.cuda.matmul`` allows it; off by default, as for the torch path), its Triton kernels do
  element-wise work and row reductions in fp32 (no ``tl.dot``). Only summation order differs from the torch path.
- log_attention: ``tl.dot`` with ``input_precision="tf32x3"`` for fp32 inputs on CUDA (3xTF32: about fp32
  accuracy, DESIGN.md 6 promises 1e-5), ``"ieee"`` under the interpreter. Plain TF32 (a 10-bit mantissa, ~5e-4
  relative per product) would likely push the Copilot's gradients past ``FP32_TOL`` (an estimate: not run on a GPU).
- rectified_decode_head: ``tl.dot`` with ``input_precision="ieee"`` for fp32 (no TF32 at all).
So fp32 results agree to a few ulps times the depth of the computation; ``FP32_TOL = 1e-4`` of each tensor's
largest magnitude leaves a factor ~100 of headroom over what the CPU run shows (~1e-6) and still catches any
real error (a wrong row, a missed rescale, a dropped term: errors of order one).
"""

from __future__ import annotations

import collections
import copy
import importlib
import json
import os
import shutil

import pytest
import torch

from tcopilot import MistakeLog, TransformerCopilot
from tcopilot._validation import triton_usable
from tcopilot.copilot import CopilotAttention
from tcopilot.generate import generate
from tcopilot.testing import VOCAB, left_padded_prompts, naive_joint_losses, tiny_pair
from tcopilot.train import TrainConfig, Trainer

DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param(
        "cuda",
        id="cuda",
        marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")],
    ),
]

# Relative to each tensor's largest magnitude; see the module docstring for why these values.
FP32_TOL = 1e-4
# bf16 model against the fp32 torch path: every bf16 rounding is 2^-8 relative, and the tiny Pilot's two layers
# (attention, MLP, norms) compound a few of them; the losses are fp32 reductions of bf16 logits.
BF16_LOSS_RTOL = 5e-3  # the CPU run shows ~6e-5
BF16_GRAD_REL = 6e-2  # ||g_bf16 - g_fp32|| / ||g_fp32|| per parameter; the CPU run shows up to 1.3e-2

# The Triton entry points: (counter name, module, function). Each api module imports its function from the
# triton_impl module at call time, so replacing the module attribute intercepts every call.
TRITON_ENTRY_POINTS = (
    ("logit_capture", "tcopilot.kernels.logit_capture.triton_impl", "logit_capture_triton"),
    ("log_attention", "tcopilot.kernels.log_attention.triton_impl", "log_attention_triton"),
    ("decode_head", "tcopilot.kernels.rectified_decode_head.triton_impl", "rectified_decode_head_triton"),
)


def fast_impl(device: str) -> str:
    """The impl a user gets on ``device`` by default, with the Triton kernels: "auto" on CUDA, and on the CPU
    "triton" in the interpreter (skipped when the interpreter is off, i.e. the cpu variant run on a GPU machine,
    where tests/conftest.py leaves TRITON_INTERPRET unset and the cuda variant covers this)."""
    if device == "cuda":
        return "auto"
    if not triton_usable(torch.device("cpu")):
        pytest.skip("Triton's interpreter is off (a CUDA machine): the cuda variant runs these kernels")
    return "triton"


@pytest.fixture
def kernels(monkeypatch):
    """Counts calls into each Triton entry point (a Counter keyed by the names of TRITON_ENTRY_POINTS).

    """
    calls = collections.Counter()
    for name, module, fn in TRITON_ENTRY_POINTS:
        mod = importlib.import_module(module)
        real = getattr(mod, fn)

        def spy(*args, _real=real, _name=name, **kwargs):
            calls[_name] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(mod, fn, spy)
    return calls


@pytest.fixture(autouse=True)
def _fp32_matmuls():
    """fp32 GEMMs at full precision (PyTorch's default) whatever ran before in this process: with TF32 allowed,
    the torch reference itself (cuBLAS, SDPA) would round to 10 bits and miss FP32_TOL."""
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(old)


def set_impl(model: TransformerCopilot, impl: str) -> TransformerCopilot:
    """``impl`` for the fused ops of the training forward and for every attention of the Copilot (each
    CopilotAttention copied its config's ``attention_impl`` when built)."""
    model.impl = impl
    if model.copilot is not None:
        model.copilot.config.attention_impl = impl
        for mod in model.copilot.modules():
            if isinstance(mod, CopilotAttention):
                mod.impl = impl
    return model


def on(model: TransformerCopilot, device: str, impl: str, dtype: torch.dtype = torch.float32):
    """A deep copy of ``model`` on ``device`` in ``dtype`` with ``impl`` everywhere."""
    return set_impl(copy.deepcopy(model).to(device=device, dtype=dtype), impl)


def batch(seed: int, device: str, batch_size: int = 3, length: int = 8) -> dict:
    """A left-padded batch (rows with 0, 2 and 4 pad positions) whose first two real positions are prompt
    (label -100), as an SFT batch: ignored rows inside and at the start of each row."""
    ids, mask = left_padded_prompts(batch=batch_size, length=length, vocab=VOCAB, seed=seed)
    labels = ids.masked_fill(mask == 0, -100)
    pos = mask.cumsum(1) - 1
    labels = labels.masked_fill((pos >= 0) & (pos < 2), -100)
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}


def assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, tol: float, name: str = "") -> None:
    """Elementwise ``|a - e| <= tol * (|e| + max|e|)``: a tolerance relative to the tensor's scale, so that
    entries near zero (most of a gradient) are not held to a relative bound they cannot meet."""
    a, e = actual.detach().float().cpu(), expected.detach().float().cpu()
    scale = float(e.abs().max()) if e.numel() else 0.0
    torch.testing.assert_close(a, e, rtol=tol, atol=tol * max(scale, 1e-30), msg=lambda m: f"{name}: {m}")


# ---------------------------------------------------------------------------------------------------- 1. training


def _step(model: TransformerCopilot, b: dict):
    model.train()
    model.zero_grad(set_to_none=True)
    out = model(**b)
    out.loss.backward()
    return out


# Parameters whose gradients must be non-zero, so that the comparison covers both models' every part: the
# Pilot's head and a decoder layer, the Copilot's input and output projections and a decoder layer of it.
KEY_GRADS = (
    "pilot.lm_head.weight",
    "pilot.model.layers.0.self_attn.q_proj.weight",
    "copilot.error_in.weight",
    "copilot.error_out.weight",
    "copilot.error_out.bias",
    "copilot.layers.1.self_attn.q_proj.weight",
)


@pytest.mark.parametrize("device", DEVICES)
def test_training_step_fast_path_equals_torch(device, kernels):
    impl = fast_impl(device)
    base = tiny_pair("llama")
    fast, ref = on(base, device, impl), on(base, device, "torch")
    b = batch(0, device)
    out = _step(fast, b)
    assert kernels["logit_capture"] >= 1 and kernels["log_attention"] >= 1, kernels
    seen = dict(kernels)
    want = _step(ref, b)
    assert dict(kernels) == seen, "the torch path called a Triton kernel"
    for field in ("loss", "pilot_loss", "copilot_loss"):
        assert torch.isfinite(getattr(out, field)), field
        assert_rel_close(getattr(out, field), getattr(want, field), FP32_TOL, field)
    assert out.num_tokens == want.num_tokens
    grads = {n: p.grad for n, p in fast.named_parameters()}
    for n, p in ref.named_parameters():
        if p.grad is None:
            assert grads[n] is None, n
            continue
        assert grads[n] is not None and grads[n].device.type == device, n
        assert torch.isfinite(grads[n]).all(), n
        assert_rel_close(grads[n], p.grad, FP32_TOL, n)
    for n in KEY_GRADS:
        assert grads[n].abs().max() > 0, f"{n}: zero gradient, the comparison is vacuous"


@pytest.mark.parametrize("device", DEVICES)
def test_training_step_bf16_model_close_to_fp32_torch(device, kernels):
    impl = fast_impl(device)
    base = tiny_pair("llama")
    fast, ref = on(base, device, impl, torch.bfloat16), on(base, device, "torch")
    b = batch(0, device)
    out = _step(fast, b)
    assert kernels["logit_capture"] >= 1 and kernels["log_attention"] >= 1, kernels
    want = _step(ref, b)
    for field in ("loss", "pilot_loss", "copilot_loss"):
        got = getattr(out, field)
        assert got.dtype == torch.float32 and torch.isfinite(got), field  # the losses are fp32 reductions
        torch.testing.assert_close(got, getattr(want, field), rtol=BF16_LOSS_RTOL, atol=0.0)
    grads = {n: p.grad for n, p in fast.named_parameters()}
    for n, p in ref.named_parameters():
        if p.grad is None:
            continue
        g = grads[n]
        assert g is not None and g.dtype == torch.bfloat16 and torch.isfinite(g).all(), n
        err = float((g.float() - p.grad).norm() / p.grad.norm().clamp(min=1e-30))
        assert err < BF16_GRAD_REL, f"{n}: relative gradient error {err:.3g}"
    for n in KEY_GRADS:
        assert grads[n].abs().max() > 0, n


# ---------------------------------------------------------------------------------------------- 2. Mistake Log

LOG_KW = dict(capacity=8, topk=8)  # pooled states in bf16, the default


def _counted_logp(model: TransformerCopilot, b: dict, counted: torch.Tensor) -> torch.Tensor:
    """The Pilot's full log-probabilities ``[Nc, V]`` of the counted rows, materialised (the oracle of top-k)."""
    with torch.no_grad():
        _, _, _, logits = naive_joint_losses(model, b["input_ids"], b["attention_mask"], b["labels"])
    return logits.reshape(-1, logits.shape[-1])[counted].log_softmax(-1)


def _assert_topk_valid(ids: torch.Tensor, logp: torch.Tensor, full_logp: torch.Tensor, name: str) -> None:
    """Each kept id carries, in the oracle's distribution, the log-probability stored at its rank: the ids are a
    top-k of the oracle up to near-ties (two paths may order ids whose logits differ by an ulp either way)."""
    assert ids.shape == logp.shape and ids.shape[0] == full_logp.shape[0], name
    assert all(len(set(row)) == len(row) for row in ids.tolist()), f"{name}: an id kept twice"
    torch.testing.assert_close(full_logp.gather(1, ids.long()), logp.float(), rtol=FP32_TOL, atol=1e-5,
                               msg=lambda m: f"{name}: {m}")
    torch.testing.assert_close(logp.float(), full_logp.topk(ids.shape[1], dim=1).values, rtol=FP32_TOL, atol=1e-5,
                               msg=lambda m: f"{name}: {m}")


def _assert_entries_equal(a, b) -> None:
    assert a.step == b.step and sorted(a.tensors()) == sorted(b.tensors())
    for k, t in a.tensors().items():
        assert t.dtype == b.tensors()[k].dtype and torch.equal(t.cpu(), b.tensors()[k].cpu()), k


@pytest.mark.parametrize("device", DEVICES)
def test_mistake_log_online_on_device_equals_cpu_then_replays_on_device(device, kernels):
    impl = fast_impl(device)
    base = tiny_pair("llama")
    dev, ref = on(base, device, impl), on(base, "cpu", "torch")
    dev.mistake_log = MistakeLog(**LOG_KW)  # pin_memory default: True when CUDA is available
    ref.mistake_log = MistakeLog(pin_memory=False, **LOG_KW)
    batches = [batch(seed, "cpu") for seed in range(2)]
    for b in batches:
        _step(dev, {k: v.to(device) for k, v in b.items()})
        _step(ref, b)
    assert kernels["logit_capture"] == 2, kernels
    dlog, rlog = dev.mistake_log, ref.mistake_log
    assert len(dlog) == len(rlog) == 2

    # The entries: host-resident (pinned when pushed from CUDA), equal to the CPU model's up to rounding.
    for i, b in enumerate(batches):
        e, r = dlog[i], rlog[i]  # indexing waits for the entry's device -> host copies (its event)
        assert e.step == r.step == i + 1
        for k, t in e.tensors().items():
            assert t.device.type == "cpu" and t.is_pinned() == (device == "cuda"), k
        for k in ("input_ids", "attention_mask", "targets"):
            assert torch.equal(getattr(e, k), getattr(r, k)), k
        for k in ("lse", "p_target"):
            torch.testing.assert_close(getattr(e, k), getattr(r, k), rtol=FP32_TOL, atol=1e-6)
        # bf16 storage: where the fp32 states differ by an ulp they may round to neighbouring bf16 values
        torch.testing.assert_close(e.pooled.float(), r.pooled.float(), rtol=2**-7, atol=1e-6)
        full = _counted_logp(ref, b, r.counted())
        _assert_topk_valid(r.topk_ids, r.topk_logp, full, "torch path on cpu: top-k")  # the oracle agrees
        _assert_topk_valid(e.topk_ids, e.topk_logp, full, f"fast path on {device}: top-k")
    # The summary, accumulated on the device and folded in by flush().
    for d_row, r_row in zip(dlog.history_table(), rlog.history_table(), strict=True):
        assert d_row["step"] == r_row["step"] and d_row["tokens"] == r_row["tokens"]
        for k in ("err_mass", "err_sq", "nll", "residual"):
            assert d_row[k] == pytest.approx(r_row[k], rel=FP32_TOL), k
    assert torch.equal(dlog.token_count, rlog.token_count)
    torch.testing.assert_close(dlog.token_err, rlog.token_err, rtol=FP32_TOL, atol=1e-6)

    # sample(device): the drawn entry's tensors on the device (non-blocking copies from pinned memory on CUDA),
    # equal to the stored entry. The draws also move the sampler away from its seeded state.
    for _ in range(3):
        s = dlog.sample(device)
        assert all(x.device.type == device for x in s.tensors().values())
        _assert_entries_equal(s, dlog[[e.step for e in dlog.entries].index(s.step)])

    # state_dict round trip into a log of another seed: same entries (pinned again on a CUDA machine), summary
    # and sampler state, so both logs then draw the same entries.
    copied = MistakeLog(**{**LOG_KW, "seed": 1})
    copied.load_state_dict(dlog.state_dict())
    assert len(copied) == len(dlog)
    for i in range(len(dlog)):
        _assert_entries_equal(copied[i], dlog[i])
        assert all(t.is_pinned() == (device == "cuda") for t in copied[i].tensors().values())
    assert copied.history_table() == dlog.history_table()
    assert torch.equal(copied.generator.get_state(), dlog.generator.get_state())
    draws = [(dlog.sample(device), copied.sample(device)) for _ in range(4)]
    for s, t in draws:
        assert all(x.device.type == device for x in t.tensors().values())
        _assert_entries_equal(s, t)
    assert len({s.step for s, _ in draws}) > 1, "every draw gave the same entry: the comparison is vacuous"

    # log_mode="replay": each training forward pushes its entry, then trains the Copilot on one sampled back to
    # the device. capacity=1 makes that sample the entry just pushed, so on CUDA the host -> device copy reads
    # pinned buffers whose device -> host copies are still queued: correct only if stream order holds.
    rep = TransformerCopilot(dev.pilot, dev.copilot, impl=impl, log_mode="replay",
                             mistake_log=MistakeLog(**{**LOG_KW, "capacity": 1}))
    rep_ref = TransformerCopilot(ref.pilot, ref.copilot, impl="torch", log_mode="replay",
                                 mistake_log=MistakeLog(pin_memory=False, **{**LOG_KW, "capacity": 1}))
    for seed in (5, 6):
        b = batch(seed, "cpu", length=6)
        got = _step(rep, {k: v.to(device) for k, v in b.items()})
        want = _step(rep_ref, b)
        assert torch.isfinite(got.copilot_loss)
        assert_rel_close(got.pilot_loss, want.pilot_loss, FP32_TOL, "pilot_loss")
        # 1e-3: the replayed pooled states are bf16, which may round differently across devices
        assert_rel_close(got.copilot_loss, want.copilot_loss, 1e-3, "replay copilot_loss")
        grads = dict(rep.copilot.named_parameters())
        for n, p in rep_ref.copilot.named_parameters():
            assert grads[n].grad is not None and grads[n].grad.device.type == device, n
            assert_rel_close(grads[n].grad, p.grad, 1e-3, f"replay copilot.{n}")
    assert len(rep.mistake_log) == 1 and rep.mistake_log.pushed == 2


# ---------------------------------------------------------------------------------------------- 3. generate()

NEW_TOKENS = 3


@pytest.mark.parametrize("device", DEVICES)
def test_generate_fast_head_equals_torch_and_samples_reproducibly(device, kernels, head_calls):
    impl = fast_impl(device)
    base = tiny_pair("llama").eval()
    with torch.no_grad():  # a strong Copilot head, so that rectifying changes tokens (asserted below)
        base.copilot.error_out.weight.normal_(0, 2.0, generator=torch.Generator().manual_seed(0))
    fast, ref = on(base, device, impl), on(base, device, "torch")
    b = batch(3, device, length=6)
    ids, mask = b["input_ids"], b["attention_mask"]
    n = NEW_TOKENS

    # greedy, fusion="probs" (the paper's Eq. 8); sampling below uses fusion="logits"
    kw = dict(attention_mask=mask, max_new_tokens=n, lam=1.0, fusion="probs", do_sample=False)
    out = generate(fast, ids, impl=impl, **kw)
    # one fused-head call per token, through its Triton kernel; the Copilot's attention in Triton too
    assert head_calls == [impl] * n and kernels["decode_head"] == n and kernels["log_attention"] > 0, kernels
    seen = dict(kernels)
    want = generate(ref, ids, impl="torch", **kw)
    assert head_calls[n:] == ["torch"] * n and dict(kernels) == seen
    assert out.device.type == device and out.shape == (ids.shape[0], ids.shape[1] + n)
    assert torch.equal(out[:, : ids.shape[1]], ids)
    assert torch.equal(out, want)
    alone = generate(ref, ids, attention_mask=mask, max_new_tokens=n, lam=0.0, do_sample=False)
    assert not torch.equal(out, alone), "the Copilot changes no token: the comparison is vacuous"

    # Sampling: a generator on the device (the sampler draws its uniforms there) makes the draw reproducible,
    # and both implementations draw the same tokens from the same generator state (README, "Decoding").
    kw = dict(attention_mask=mask, max_new_tokens=n, lam=1.0, fusion="logits", do_sample=True, temperature=0.9,
              top_k=30, top_p=0.95)

    def draw(model, impl_, seed):
        return generate(model, ids, impl=impl_, generator=torch.Generator(device=device).manual_seed(seed), **kw)

    kernels.clear()
    first = draw(fast, impl, 11)
    assert kernels["decode_head"] == n
    assert torch.equal(draw(fast, impl, 11), first)
    assert torch.equal(draw(ref, "torch", 11), first)
    assert not torch.equal(draw(ref, "torch", 12), first), "the seed changes no draw: the comparison is vacuous"


# ---------------------------------------------------------------------------------------------- 4. Trainer


def _examples(n: int = 8, seed: int = 0) -> list[dict]:
    """Sequences counting up by a stride, of different lengths (so batches pad) after prompts of different
    lengths (labels -100), as tests/models/test_train.py builds them."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        start, stride = int(torch.randint(1, VOCAB, (1,), generator=g)), int(torch.randint(1, 4, (1,), generator=g))
        length, prompt = int(torch.randint(7, 11, (1,), generator=g)), int(torch.randint(1, 4, (1,), generator=g))
        ids = [(start + stride * i) % (VOCAB - 1) + 1 for i in range(length)]
        out.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return out


def _config(**kw) -> TrainConfig:
    # grad_accum=2: the step's token count crosses micro-batches; keep_log: the Mistake Log is checkpointed
    base = dict(steps=3, batch_size=2, grad_accum=2, lr_pilot=3e-3, lr_copilot=3e-3, warmup_steps=1, log_every=1,
                ckpt_every=1, keep_checkpoints=2, keep_log=True, log_topk=8, seed=0)
    return TrainConfig(**{**base, **kw})


def _metrics(run_dir) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as fh:
        return [json.loads(line) for line in fh]


METRICS = ("pilot_loss", "copilot_loss", "grad_norm_pilot", "grad_norm_copilot", "error_mass", "topk_residual")


@pytest.mark.parametrize("device", DEVICES)
def test_trainer_on_device_equals_torch_and_resumes(device, kernels, tmp_path):
    impl = fast_impl(device)
    examples, base = _examples(), tiny_pair("llama")
    run_a = tmp_path / "a"
    a = Trainer(on(base, device, impl), examples, _config(), str(run_a), progress=False)
    a.train(stop_after=2)
    assert kernels["logit_capture"] == 4 and kernels["log_attention"] > 0, kernels  # 2 steps x 2 micro-batches
    seen = dict(kernels)
    # the reference runs all 3 steps: steps 1-2 check the fast path, step 3 the resumed run below
    ref = Trainer(on(base, device, "torch"), examples, _config(ckpt_every=0), str(tmp_path / "ref"), progress=False)
    ref.train()
    assert dict(kernels) == seen
    got, want = _metrics(run_a), _metrics(tmp_path / "ref")
    assert [m["step"] for m in got] == [1, 2] and [m["step"] for m in want] == [1, 2, 3]

    def check(g: dict, w: dict) -> None:
        assert g["step"] == w["step"] and g["tokens"] == w["tokens"] > 0
        for k in METRICS:
            assert torch.isfinite(torch.tensor(g[k])), (g["step"], k)
            assert g[k] == pytest.approx(w[k], rel=FP32_TOL), (g["step"], k)

    for g, w in zip(got, want[:2]):
        check(g, w)
    assert sorted(os.listdir(run_a)) == ["checkpoint-1", "checkpoint-2", "config.json", "metrics.jsonl"]

    # "Killed" after step 2: a new process with other weights resumes from a copy of the run directory.
    run_b = tmp_path / "b"
    shutil.copytree(run_a, run_b)
    b = Trainer(on(tiny_pair("llama", seed=5), device, impl), examples, _config(), str(run_b), progress=False)
    assert b.maybe_resume() and b.step == 2
    for (n, p), (_, q) in zip(b.model.state_dict().items(), a.model.state_dict().items(), strict=True):
        assert p.device.type == device and torch.equal(p, q), n
    for opt_b, opt_a in ((b.opt_pilot, a.opt_pilot), (b.opt_copilot, a.opt_copilot)):
        sb, sa = opt_b.state_dict()["state"], opt_a.state_dict()["state"]
        assert sorted(sb) == sorted(sa) and len(sa) > 0
        for i in sa:
            for k, v in sa[i].items():
                assert torch.equal(sb[i][k].cpu(), v.cpu()), (i, k)
                if k != "step":
                    assert sb[i][k].device.type == device, (i, k)
    assert len(b.mistake_log) == len(a.mistake_log) == 4  # one entry per micro-batch
    for i in range(4):
        _assert_entries_equal(b.mistake_log[i], a.mistake_log[i])
    # The resumed run's step 3 is the uninterrupted reference's step 3.
    b.train()
    assert b.step == 3
    last = _metrics(run_b)
    assert [m["step"] for m in last] == [1, 2, 3]
    check(last[-1], want[-1])
    assert {"checkpoint-2", "checkpoint-3", "mistake_log"} <= set(os.listdir(run_b))
