"""Compile every tcopilot Triton kernel for sm_90 (H100/H200) on a machine without a GPU.

Why: the kernels are tested only under ``TRITON_INTERPRET=1``, which checks what they compute but not that
they compile for a real target or fit in its shared memory. A lent GPU's few minutes should not be spent
finding that out. Triton compiles for an NVIDIA target without a device (ptxas ships in the wheel), so this
script runs the whole pipeline (TTIR -> TTGIR -> LLVM -> PTX -> cubin) for each launch configuration the
CUDA code path uses and reads off what the hardware would care about:

* shared memory per block (``metadata.shared``) against the H100/H200 limit of 227 KiB (232448 bytes);
* registers per thread and spill bytes, from ptxas' own ``-v`` report;
* whether each ``tl.dot`` became a Hopper warp-group MMA (``ttng.warp_group_dot`` in the TTGIR) or stayed a
  ``tt.dot`` (lowered to the older ``mma.sync``); small M tiles (< 64 rows) never get wgmma;
* the compile time.

Compile-time only: nothing is launched or timed. Configurations come from the kernels' own tables (read at
run time, so a changed table is what gets compiled); the arguments are example values of a representative
shape and are specialised exactly as ``JITFunction.run`` does at a launch (16-byte aligned pointers and
integers divisible by 16 get ``tt.divisibility = 16``, an integer equal to 1 becomes a constant), because
that changes vectorisation and hence registers. Every kernel parameter must be named in the example table
below: a new kernel argument fails loudly here instead of being compiled with a guess.

    python benchmarks/sm90_compile.py                    # everything -> benchmarks/results/sm90-compile.md
    python benchmarks/sm90_compile.py --quick            # one representative configuration per kernel
    python benchmarks/sm90_compile.py --kernel log_attention_bwd --out /tmp/x.md --json /tmp/x.json

Importable: ``cases(quick=..., kernel=...)`` and ``compile_case(case)``; both need a process in which the
kernel modules were imported WITHOUT ``TRITON_INTERPRET`` (``main`` removes it before importing them).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import io
import json
import os
import re
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

# H100 / H200: 228 KiB of shared memory per SM, of which at most 227 KiB per block (1 KiB is reserved).
SHARED_LIMIT = 232448
TARGET_ARCH = 90
HEAVY_SPILL_BYTES = 256  # "heavy" in the summary: more than this many bytes of spill stores per thread
ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "sm90-compile.md"


def ptxas_path() -> str | None:
    """The ptxas Triton would use for sm_90, or None when there is none (the test skips then)."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        path = get_ptxas(TARGET_ARCH).path
    except Exception:  # noqa: BLE001 - any failure to locate it means "cannot compile here"
        return None
    return path if path and os.path.isfile(path) else None


# --------------------------------------------------------------------------------------------------------
# Cases
# --------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Ptr:
    """Stands in for a tensor argument: what the launch specialisation looks at (dtype, pointer alignment)."""

    dtype: object  # a torch.dtype

    def data_ptr(self) -> int:
        # Fresh tensors from torch's CUDA caching allocator are 512-byte aligned; every launcher here passes
        # fresh or contiguous tensors (a view at an odd offset would compile a non-divisible variant).
        return 0x7F00_0000_0000


@dataclasses.dataclass
class Case:
    kernel: str  # display name, e.g. "log_attention_fwd"
    fn: object  # the @triton.jit function
    config: str  # human-readable launch configuration
    dtype: str
    args: dict  # runtime (non-constexpr) parameters by name: Ptr, int or float, as at a real launch
    constexprs: dict
    num_warps: int
    num_stages: int = 3  # Triton's default when a launch passes none
    quick: bool = False  # the representative configuration of this kernel (--quick, the test)
    notes: tuple[str, ...] = ()
    # Rows (M) of the kernel's tl.dot tiles: wgmma needs M >= 64 (a warp group's 64-row slab), so a dot with
    # a smaller M is expected to stay mma.sync; one with M >= 64 that does not get wgmma is a finding.
    dot_m: int | None = None


class SignatureMismatch(RuntimeError):
    """The example table of this script no longer matches a kernel's parameter list."""


def _torch_dtype(name: str):
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "fp64": torch.float64}[name]


def _pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


def _cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


# ---- log_attention -------------------------------------------------------------------------------------

# Representative training shape: Llama-3.2-1B-like heads (32 query heads, 8 kv heads: GQA group 4), a
# 2048-token sequence against a 4096-entry log. Contiguous [B, H, L, D] tensors (B itself is no argument).
_LA_HQ, _LA_LQ, _LA_LK = 32, 2048, 4096
# Decode: batch 4 against a 4096-entry cache; the packed rows are Lq x GROUP (16 -> Lq=1 with group 4).
_LA_DEC_B, _LA_DEC_LK = 4, 4096
_LA_DEC_ROWS = {16: (1, 4), 32: (8, 4), 64: (16, 4)}  # BLOCK_M -> (Lq, GROUP)
_H100_SMS = 132


def _la_strides(prefix: str, h: int, length: int, d: int) -> dict:
    """Strides of a contiguous [B, h, length, d] tensor, named as the kernels name them (rows: m or n)."""
    row = "m" if prefix in ("q", "o", "do", "dq") else "n"
    return {f"stride_{prefix}b": h * length * d, f"stride_{prefix}h": length * d, f"stride_{prefix}{row}": d}


def _log_attention_cases() -> Iterator[Case]:
    from tcopilot.kernels.log_attention import triton_impl as la

    tables = {"fwd": (la._FWD_CFG, la._FP32_FWD_CFG), "dkdv": (la._DKDV_CFG, la._FP32_DKDV_CFG),
              "dq": (la._DQ_CFG, la._FP32_DQ_CFG)}  # fmt: skip
    import torch

    for dname in ("bf16", "fp16", "fp32"):
        dt = _torch_dtype(dname)
        prec = la._dot_precision(dt)
        for hd in (128, 64, 256):
            # Head dims 64 and 128 get the whole autotune list; 256 (Gemma-like) the list in bf16 and the
            # table configuration otherwise: it has the largest tiles, hence the most shared memory.
            full_tune = hd != 256 or dname == "bf16"
            dims = dict(HEAD_DIM=hd, V_DIM=hd, BLOCK_D=hd, BLOCK_DV=hd, DOT_PREC=prec)
            qkv = Ptr(dt)
            i32, f32 = Ptr(torch.int32), Ptr(torch.float32)
            for kind, fn in (("fwd", la._log_attention_fwd_kernel), ("bwd_dkdv", la._log_attention_bwd_dkdv_kernel),
                             ("bwd_dq", la._log_attention_bwd_dq_kernel)):  # fmt: skip
                bm, bn, tw, ts = tables[kind.replace("bwd_", "")][dt == torch.float32][hd]
                # The autotune candidates of this kernel, head dim and dtype (the list prunes spilling ones).
                tune = [(c.num_warps, c.num_stages, dict(c.kwargs))
                        for c in la._tune_configs(kind.replace("bwd_", ""), hd, dt)]  # fmt: skip
                nqb, nkb = _cdiv(_LA_LQ, bm), _cdiv(_LA_LK, bn)
                for group in (4, 1):
                    hk = _LA_HQ // group
                    common = dict(Q=qkv, K=qkv, V=qkv, QPOS=i32, KPOS=i32, FULL_CNT=i32, FULL_IDX=i32,
                                  PART_CNT=i32, PART_IDX=i32, sm_scale2=hd**-0.5 * 1.4427,
                                  **_la_strides("q", _LA_HQ, _LA_LQ, hd), **_la_strides("k", hk, _LA_LK, hd),
                                  **_la_strides("v", hk, _LA_LK, hd), stride_qpos_b=_LA_LQ, stride_kpos_b=_LA_LK,
                                  GROUP=group, Lq=_LA_LQ, Lk=_LA_LK, NQB=nqb, NKB=nkb)  # fmt: skip
                    if kind == "fwd":
                        args = dict(common, OUT=qkv, LSE=f32, H=_LA_HQ, **_la_strides("o", _LA_HQ, _LA_LQ, hd))
                    elif kind == "bwd_dkdv":
                        args = dict(common, DO=qkv, LSE=f32, DELTA=f32, DK=qkv, DV=qkv, sm_scale=hd**-0.5,
                                    H=_LA_HQ, HK=hk, **_la_strides("do", _LA_HQ, _LA_LQ, hd),
                                    **_la_strides("dk", hk, _LA_LK, hd), **_la_strides("dv", hk, _LA_LK, hd))
                        # fmt: skip
                    else:
                        args = dict(common, DO=qkv, LSE=f32, DELTA=f32, DQ=qkv, sm_scale=hd**-0.5, H=_LA_HQ,
                                    **_la_strides("do", _LA_HQ, _LA_LQ, hd), **_la_strides("dq", _LA_HQ, _LA_LQ, hd))
                        # fmt: skip
                    # GROUP=1 (plain multi-head attention) is a separate specialisation (1 becomes a
                    # constant); compiled once per head dim at the table configuration, bf16 only.
                    if group == 1 and dname != "bf16":
                        continue
                    # TCOPILOT_AUTOTUNE=0 launches the table's (warps, stages) even if the list lacks it.
                    launches = tune + ([(tw, ts, {})] if all((w, s) != (tw, ts) for w, s, _ in tune) else [])
                    for w, s, kw in launches:
                        is_table = (w, s) == (tw, ts)
                        if (group == 1 or not full_tune) and not is_table:
                            continue
                        notes = ("table (TCOPILOT_AUTOTUNE=0)",) if is_table else ()
                        yield Case(
                            kernel=f"log_attention_{kind}", fn=fn, dtype=dname,
                            config=f"D={hd} M{bm} N{bn} w{w} s{s}" + (" MHA" if group == 1 else ""),
                            args=args, constexprs=dict(dims, BLOCK_M=bm, BLOCK_N=bn, **kw), num_warps=w,
                            num_stages=s, quick=is_table and hd == 128 and dname == "bf16" and group == 4,
                            notes=notes, dot_m=bn if kind == "bwd_dkdv" else bm,  # dK/dV: [keys, queries] tiles
                        )  # fmt: skip

            # Split-K decode and its combine kernel: fixed configurations (no autotune). Only the packed
            # tiles the launcher routes there (fp32 sends some to the regular forward kernel, compiled above).
            for block_m, (lq, group) in _LA_DEC_ROWS.items():
                if not la._use_decode(lq, group, hd, dt):
                    continue
                hk = _LA_HQ // group
                block_n, w, s = la._decode_cfg(hd, block_m, dt)
                nkb = _cdiv(_LA_DEC_LK, block_n)
                splits = max(1, min(nkb, _cdiv(2 * _H100_SMS, _LA_DEC_B * hk)))
                tps = _cdiv(nkb, splits)
                splits = _cdiv(nkb, tps)
                args = dict(Q=qkv, K=qkv, V=qkv, QPOS=i32, KPOS=i32, M_PART=f32, L_PART=f32, ACC_PART=f32,
                            sm_scale2=hd**-0.5 * 1.4427, **_la_strides("q", _LA_HQ, lq, hd),
                            **_la_strides("k", hk, _LA_DEC_LK, hd), **_la_strides("v", hk, _LA_DEC_LK, hd),
                            stride_qpos_b=lq, stride_kpos_b=_LA_DEC_LK, H=_LA_HQ, HK=hk, GROUP=group, Lq=lq,
                            Lk=_LA_DEC_LK, NSPLIT=splits, TILES_PER_SPLIT=tps, NKB=nkb)  # fmt: skip
                yield Case(
                    kernel="log_attention_decode", fn=la._log_attention_decode_kernel, dtype=dname,
                    config=f"D={hd} M{block_m} (Lq={lq} x group {group}) N{block_n} w{w} s{s}", args=args,
                    constexprs=dict(dims, BLOCK_M=block_m, BLOCK_N=block_n), num_warps=w, num_stages=s,
                    quick=block_m == 16 and hd == 128 and dname == "bf16", dot_m=block_m,
                )  # fmt: skip
                if block_m == 16:
                    yield Case(
                        kernel="log_attention_decode_combine", fn=la._log_attention_decode_combine_kernel,
                        dtype=dname, config=f"D={hd} splits={splits}",
                        args=dict(M_PART=f32, L_PART=f32, ACC_PART=f32, OUT=qkv, LSE=f32, NSPLIT=splits),
                        constexprs=dict(V_DIM=hd, BLOCK_DV=hd, BLOCK_S=_pow2(splits)), num_warps=4,
                        quick=hd == 128 and dname == "bf16",
                    )  # fmt: skip
            # Backward preprocess (delta = rowsum(dO * O)): BLOCK_M 64, 4 warps, as the launcher sets.
            yield Case(
                kernel="log_attention_bwd_preprocess", fn=la._log_attention_bwd_preprocess, dtype=dname,
                config=f"D={hd} M64 w4",
                args=dict(OUT=qkv, DO=qkv, DELTA=f32, **_la_strides("o", _LA_HQ, _LA_LQ, hd),
                          **_la_strides("do", _LA_HQ, _LA_LQ, hd), H=_LA_HQ, Lq=_LA_LQ, NQB=_cdiv(_LA_LQ, 64)),
                constexprs=dict(V_DIM=hd, BLOCK_DV=hd, BLOCK_M=64), num_warps=4,
                quick=hd == 128 and dname == "bf16",
            )  # fmt: skip


def _tile_schedule_cases() -> Iterator[Case]:
    # The schedule kernel depends on the tiles only: one case per (BLOCK_M, BLOCK_N, direction) that some
    # table sends to a launch (forward and dQ by query block, dK/dV by key tile), at the training shape.
    import torch

    from tcopilot.kernels.log_attention import schedule
    from tcopilot.kernels.log_attention import triton_impl as la

    i32 = Ptr(torch.int32)
    seen = set()
    for kind in ("fwd", "dkdv", "dq"):
        for fp32 in (False, True):
            for bm, bn, _, _ in la._blocks_table(kind, fp32).values():
                by_key = kind == "dkdv"
                if (bm, bn, by_key) in seen:
                    continue
                seen.add((bm, bn, by_key))
                nqb, nkb = _cdiv(_LA_LQ, bm), _cdiv(_LA_LK, bn)
                rows, cols = (nkb, nqb) if by_key else (nqb, nkb)
                chunk = max(2, min(_pow2(cols), schedule._CHUNK_ELEMENTS // (bm if by_key else bn)))
                yield Case(
                    kernel="log_attention_schedule", fn=schedule._tile_schedule_kernel, dtype="int32",
                    config=f"M{bm} N{bn} {'by key' if by_key else 'by query'} chunk {chunk} w4",
                    args=dict(QPOS=i32, KPOS=i32, FULL_CNT=i32, FULL_IDX=i32, PART_CNT=i32, PART_IDX=i32,
                              stride_qpos_b=_LA_LQ, stride_kpos_b=_LA_LK, Lq=_LA_LQ, Lk=_LA_LK, N_ROWS=rows,
                              N_COLS=cols),
                    constexprs=dict(BLOCK_M=bm, BLOCK_N=bn, CHUNK=chunk, BY_KEY=by_key), num_warps=4,
                    quick=len(seen) == 1,
                )  # fmt: skip


# ---- logit_capture -------------------------------------------------------------------------------------

# Representative shape of the module docstring: N=8192 tokens, V=128256 (Llama 3), bf16; forward chunks of
# T=160 rows, backward blocks of 8192 x 2560.
_LC_N, _LC_V, _LC_T, _LC_VC = 8192, 128256, 160, 2560
# (label, HAS_SOFTCAP, HAS_SMOOTHING, WRITE_P, topk): the flag combinations of the forward kernel that matter.
_LC_FWD_FLAGS = [
    ("loss only", False, False, False, 0),
    ("values", False, False, True, 0),
    ("values topk=8", False, False, True, 8),
    ("softcap smoothing", True, True, False, 0),
    ("all, topk=128", True, True, True, 128),
]
# (label, HAS_SOFTCAP, WRITE_DZ, WRITE_P)
_LC_BWD_FLAGS = [
    ("dz", False, True, False),
    ("dz softcap", True, True, False),
    ("dz + p (values grad)", False, True, True),
    ("p only", False, False, True),
]


def _logit_capture_cases() -> Iterator[Case]:
    import torch

    from tcopilot.kernels.logit_capture import triton_impl as lc

    (fbm, fbv), (bbm, bbv), warps = lc._launch_defaults(torch.device("cuda"), lc.CaptureTuning())
    for dname in ("bf16", "fp16", "fp32", "fp64"):
        dt = _torch_dtype(dname)
        acc = Ptr(lc._acc_dtype(dt))
        i64 = Ptr(torch.int64)
        bm, bv = lc._block(_LC_T, fbm, 2), lc._block(_LC_V, fbv, 16)
        for label, cap, smooth, write_p, topk in _LC_FWD_FLAGS:
            # fp64 is supported but not a fast path: its base configuration only.
            if dname == "fp64" and label != "loss only":
                continue
            in_kernel = 0 < topk <= lc.TOPK_MAX_IN_KERNEL
            k_pad = lc._block(topk, lc.TOPK_MAX_IN_KERNEL, 2) if in_kernel else 2
            args = dict(
                logits_ptr=Ptr(dt), stride_lm=_LC_V, p_ptr=Ptr(dt), stride_pm=_LC_V, labels_ptr=i64, lse_ptr=acc,
                p_target_ptr=acc, p_sq_ptr=acc, loss_ptr=acc, params_ptr=acc,
                topk_ids_ptr=i64 if in_kernel else acc, topk_logits_ptr=acc,
                stride_km=topk if in_kernel else 1, n_rows=_LC_T, V=_LC_V, K=topk if in_kernel else 1,
                ignore_index=-100,
            )  # fmt: skip
            yield Case(
                kernel="logit_capture_fwd", fn=lc._logit_capture_fwd_kernel, dtype=dname,
                config=f"{label}; M{bm} V{bv} w{warps}", args=args,
                constexprs=dict(HAS_SOFTCAP=cap, HAS_SMOOTHING=smooth, WRITE_P=write_p, TOPK=in_kernel, BLOCK_M=bm,
                                BLOCK_V=bv, K_PAD=k_pad),
                num_warps=warps, quick=label == "values topk=8" and dname == "bf16",
            )  # fmt: skip
        bm, bv = lc._block(_LC_N, bbm, 2), lc._block(_LC_VC, bbv, 16)
        for label, cap, dz, write_p in _LC_BWD_FLAGS:
            if dname == "fp64" and label != "dz":
                continue
            args = dict(
                logits_ptr=Ptr(dt), stride_lm=_LC_VC, p_ptr=Ptr(dt), stride_pm=_LC_VC, labels_ptr=i64, lse_ptr=acc,
                dloss_ptr=acc, params_ptr=acc, n_rows=_LC_N, n_cols=_LC_VC, col_offset=_LC_VC, V=_LC_V,
            )  # fmt: skip
            yield Case(
                kernel="logit_capture_bwd", fn=lc._logit_capture_bwd_kernel, dtype=dname,
                config=f"{label}; M{bm} V{bv} w{warps}", args=args,
                constexprs=dict(HAS_SOFTCAP=cap, WRITE_DZ=dz, WRITE_P=write_p, BLOCK_M=bm, BLOCK_V=bv),
                num_warps=warps, quick=label == "dz + p (values grad)" and dname == "bf16",
            )  # fmt: skip


# ---- rectified_next_token ------------------------------------------------------------------------------

_RNT_B, _RNT_V = 32, 128256
_RDH_PARTS = 1002  # the decode head's softmax partials per row: ceil(128256 / 128) vocabulary blocks
# (label, FUSION_PROBS, SAMPLE, PHILOX, SEED_PER_ROW, WRITE_PASSES, HAS_STATS). Greedy and unfiltered rows run
# the split kernels on a GPU (below); this kernel serves them only when forced (split=False, benchmarks).
_RNT_FLAGS = [
    ("greedy probs", True, False, False, False, False, False),
    ("greedy logits", False, False, False, False, False, False),
    ("sample probs", True, True, False, False, False, False),
    ("sample logits", False, True, False, False, False, False),
    ("sample probs philox", True, True, True, False, False, False),
    ("sample probs philox per-row seed", True, True, True, True, False, False),
    ("sample probs + passes", True, True, False, False, True, False),
    ("sample probs, decode-head partials", True, True, False, False, False, True),
]


def _rectified_next_token_cases() -> Iterator[Case]:
    import torch

    from tcopilot.kernels.rectified_next_token import triton_impl as rnt

    block_v, block_s, warps, cap = rnt._GPU_CFG
    block_v = min(block_v, _pow2(_RNT_V))
    block_s = min(block_s, max(16, _pow2(_RNT_V)))
    for dname in ("bf16", "fp16", "fp32"):
        dt = _torch_dtype(dname)
        f32, i32, i64 = Ptr(torch.float32), Ptr(torch.int32), Ptr(torch.int64)
        for label, probs, sample, philox, per_row, passes, stats in _RNT_FLAGS:
            if stats and dname != "fp32":
                continue  # the decode head's scratch is fp32
            # As the launcher passes them: unused pointers are other tensors of the call.
            u = f32 if sample and not philox else Ptr(dt)
            parts = _RDH_PARTS if stats else 1
            args = dict(
                z_ptr=Ptr(dt), f_ptr=Ptr(dt), u_ptr=u, seed_ptr=i64 if philox else i32, out_ptr=i64,
                passes_ptr=i32 if passes else i64, bufw_ptr=f32 if sample else i64, bufi_ptr=i32 if sample else i64,
                lam_ptr=f32, temp_ptr=f32, topk_ptr=i32, topp_ptr=f32,
                pm_ptr=f32 if stats else i64, ps_ptr=f32 if stats else i64, pa_ptr=i64,
                V=_RNT_V, stride_z=_RNT_V, stride_f=_RNT_V, stride_u=_RNT_V if sample and not philox else 0,
                P=parts,
            )  # fmt: skip
            yield Case(
                kernel="rectified_next_token", fn=rnt._rectified_next_token_kernel, dtype=dname,
                config=f"{label}; V{block_v} S{block_s} C{cap} w{warps}", args=args,
                constexprs=dict(FUSION_PROBS=probs, SAMPLE=sample, PHILOX=philox, SEED_PER_ROW=per_row,
                                HAS_STATS=stats, BLOCK_P=min(1024, _pow2(parts)),
                                BLOCK_V=block_v, BLOCK_S=block_s, NPIV=rnt._NPIV, N_VALUE=rnt._N_VALUE_PIVOTS,
                                MAX_PASSES=rnt._MAX_SEARCH_PASSES, CAP=cap, WRITE_PASSES=passes),
                num_warps=warps, quick=label == "sample probs" and dname == "bf16",
            )  # fmt: skip


# (label, FUSION_PROBS, SAMPLE, PHILOX, SEED_PER_ROW, partials from the decode head)
_SPLIT_FLAGS = [
    ("greedy probs", True, False, False, False, False),
    ("greedy logits", False, False, False, False, False),
    ("sample probs", True, True, False, False, False),
    ("sample logits", False, True, False, False, False),
    ("sample probs philox per-row seed", True, True, True, True, False),
    ("greedy probs, decode-head partials", True, False, False, False, True),
    ("sample probs, decode-head partials", True, True, False, False, True),
]


def _rectified_next_token_split_cases() -> Iterator[Case]:
    import torch

    from tcopilot.kernels.rectified_next_token import triton_split as rs

    chunk, warps = rs._GPU_CHUNK, rs._GPU_WARPS
    tiles = -(-_RNT_V // chunk)
    f32, i64 = Ptr(torch.float32), Ptr(torch.int64)
    for dname in ("bf16", "fp16", "fp32"):
        dt = _torch_dtype(dname)
        yield Case(
            kernel="rectified_next_token_split", fn=rs._softmax_partials_kernel, dtype=dname,
            config=f"softmax partials; C{chunk} w{warps}",
            args=dict(z_ptr=Ptr(dt), pm_ptr=f32, ps_ptr=f32, pa_ptr=i64, V=_RNT_V, stride_z=_RNT_V, S=tiles),
            constexprs=dict(CHUNK=chunk), num_warps=warps,
        )  # fmt: skip
        for label, probs, sample, philox, per_row, head in _SPLIT_FLAGS:
            if head and dname != "fp32":
                continue  # the decode head's scratch is fp32
            parts = _RDH_PARTS if head else tiles if probs else 1
            stat = dict(pm_ptr=f32, ps_ptr=f32, pa_ptr=i64) if probs else dict(pm_ptr=i64, ps_ptr=i64, pa_ptr=i64)
            race = dict(rm_ptr=f32, rb_ptr=f32, ra_ptr=i64)
            block_p = min(rs._MAX_BLOCK_P, _pow2(parts))
            args = dict(
                z_ptr=Ptr(dt), f_ptr=Ptr(dt), u_ptr=f32 if sample and not philox else Ptr(dt),
                seed_ptr=i64 if philox else Ptr(dt), lam_ptr=f32, temp_ptr=f32, **stat, gb_ptr=f32, ga_ptr=i64,
                **race, V=_RNT_V, stride_z=_RNT_V, stride_f=_RNT_V,
                stride_u=_RNT_V if sample and not philox else 0, P=parts, S=tiles,
            )  # fmt: skip
            yield Case(
                kernel="rectified_next_token_split", fn=rs._choice_partials_kernel, dtype=dname,
                config=f"choice partials, {label}; C{chunk} P{block_p} w{warps}", args=args,
                constexprs=dict(FUSION_PROBS=probs, SAMPLE=sample, PHILOX=philox, SEED_PER_ROW=per_row,
                                CHUNK=chunk, BLOCK_P=block_p),
                num_warps=warps, quick=label == "sample probs" and dname == "bf16",
            )  # fmt: skip
            if dname != "fp32" or philox or (head and not sample):
                continue  # the combine reads fp32 / int64 partials only, draws nothing, and folds the head's
                # partials only for a sampling row's fallback: these variants compile to the PTX of another
            args = dict(out_ptr=i64, temp_ptr=f32, **stat, gb_ptr=f32, ga_ptr=i64, **race, V=_RNT_V, P=parts, S=tiles)
            yield Case(
                kernel="rectified_next_token_split", fn=rs._combine_kernel, dtype="fp32",
                config=f"combine, {label}; S{_pow2(tiles)} P{block_p} w{warps}", args=args,
                constexprs=dict(FUSION_PROBS=probs, SAMPLE=sample, BLOCK_S=min(rs._MAX_BLOCK_P, _pow2(tiles)),
                                BLOCK_P=block_p),
                num_warps=warps,
            )  # fmt: skip


# ---- rectified_decode_head -----------------------------------------------------------------------------

# Llama-3.2-1B head (d=2048, V=128256), Copilot width 2048; the hidden states are hidden[:, -1] views of a
# [B, L, d] tensor (row stride L*d, unit column stride), the weights contiguous.
_RDH_V, _RDH_D, _RDH_C, _RDH_L = 128256, 2048, 2048, 512
# (label, batch, dtype of h and W, dtype of g and A, HAS_F_BIAS, SOFTCAP, HAS_Z_BIAS). "bias" is the Copilot's
# error_out bias (added to f), "pilot bias" the Pilot's LM-head bias (lm_head_bias, added to z: Phi, GPT-J, CodeGen).
# Every case writes the softmax partials (WRITE_STATS: fusion="probs", the default); _RDH_LOGITS_CASES do not.
_RDH_CASES = [
    ("B=1", 1, "bf16", "bf16", False, False, False),
    ("B=32", 32, "bf16", "bf16", False, False, False),
    ("B=64 bias softcap", 64, "bf16", "bf16", True, True, False),
    ("B=1", 1, "fp16", "fp16", False, False, False),
    ("B=64 bias softcap", 64, "fp16", "fp16", True, True, False),
    ("B=1", 1, "fp32", "fp32", False, False, False),
    ("B=32 bias softcap", 32, "fp32", "fp32", True, True, False),
    ("B=32 bias softcap, fp32 h / bf16 W", 32, "fp32", "bf16", True, True, False),
    # the Pilot's bias on: decode at B=1 (Phi-2's case), and with every option on where registers are tightest
    ("B=1 both biases", 1, "bf16", "bf16", True, False, True),
    ("B=64 both biases softcap", 64, "bf16", "bf16", True, True, True),
    ("B=64 both biases softcap", 64, "fp16", "fp16", True, True, True),
    ("B=32 both biases softcap", 32, "fp32", "fp32", True, True, True),
    ("B=32 both biases softcap, fp32 h / bf16 W", 32, "fp32", "bf16", True, True, True),
]
_RDH_LOGITS_CASES = [("B=1 logits fusion", 1, "bf16", "bf16", False, False, False),
                     ("B=64 logits fusion, bias softcap", 64, "bf16", "bf16", True, True, False)]


def _rectified_decode_head_cases() -> Iterator[Case]:
    import torch

    from tcopilot.kernels.rectified_decode_head import triton_impl as rdh

    cuda = torch.device("cuda")
    for label, bsz, zd, fd, bias, cap, z_bias in _RDH_CASES + _RDH_LOGITS_CASES:
        stats = "logits" not in label
        # h and W share a dtype (the api checks it); "fp32 h / bf16 W" is the pilot in fp32, the Copilot in bf16.
        h_dt, w_dt = _torch_dtype(zd), _torch_dtype(zd if zd == fd else "bf16")
        g_dt = a_dt = _torch_dtype(fd)
        z_native = h_dt == w_dt and h_dt in (torch.float16, torch.bfloat16)
        f_native = g_dt == a_dt and g_dt in (torch.float16, torch.bfloat16)
        elt = max(t.itemsize for t in (h_dt, w_dt, g_dt, a_dt))
        cfg = rdh._config(cuda, bsz, z_native and f_native, elt)
        meta = {k: v for k, v in cfg.items() if k not in ("num_warps", "num_stages")}
        args = dict(
            # an absent bias is passed as z (fp32); the Pilot's bias comes in W's dtype (lm_head_operands)
            h_ptr=Ptr(h_dt), w_ptr=Ptr(w_dt), zb_ptr=Ptr(w_dt if z_bias else torch.float32), g_ptr=Ptr(g_dt),
            a_ptr=Ptr(a_dt), fb_ptr=Ptr(a_dt if bias else torch.float32), z_ptr=Ptr(torch.float32),
            f_ptr=Ptr(torch.float32), pm_ptr=Ptr(torch.float32), ps_ptr=Ptr(torch.float32),
            pa_ptr=Ptr(torch.int64 if stats else torch.float32),
            B=bsz, V=_RDH_V, D=_RDH_D, C=_RDH_C, s_h0=_RDH_L * _RDH_D, s_h1=1, s_w0=_RDH_D, s_w1=1,
            s_g0=_RDH_L * _RDH_C, s_g1=1, s_a0=_RDH_C, s_a1=1, softcap=30.0 if cap else 1.0,
        )  # fmt: skip
        blocks = " ".join(f"{k.split('_')[1][0]}{v}" for k, v in meta.items())
        yield Case(
            kernel="rectified_decode_head", fn=rdh._decode_head_products_kernel,
            dtype=zd if zd == fd else f"{zd}/{fd}",
            config=f"{label}; {blocks} w{cfg['num_warps']} s{cfg['num_stages']}", args=args,
            constexprs=dict(meta, HAS_Z_BIAS=z_bias, HAS_F_BIAS=bias, SOFTCAP=cap, Z_NATIVE=z_native,
                            F_NATIVE=f_native, WRITE_STATS=stats),
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], quick=label == "B=1" and zd == "bf16",
            dot_m=meta.get("BLOCK_B"),
        )  # fmt: skip


_GENERATORS = {
    "log_attention": _log_attention_cases,
    "log_attention_schedule": _tile_schedule_cases,
    "logit_capture": _logit_capture_cases,
    "rectified_next_token": _rectified_next_token_cases,
    "rectified_next_token_split": _rectified_next_token_split_cases,
    "rectified_decode_head": _rectified_decode_head_cases,
}


def cases(quick: bool = False, kernel: str | None = None) -> list[Case]:
    """All cases (or the representative one per kernel with ``quick``) whose kernel name contains ``kernel``.

    A module whose cases cannot be built (import error, a renamed table) yields one failing pseudo-case per
    module, so that the report shows it rather than the run dying half-way.
    """
    _check_not_interpreted()
    out = []
    for module, gen in _GENERATORS.items():
        try:
            built = list(gen())
        except Exception as err:  # noqa: BLE001 - reported as a FAIL row
            built = [Case(kernel=module, fn=None, config="(building the cases)", dtype="-", args={}, constexprs={},
                          num_warps=0, quick=True, notes=(f"{type(err).__name__}: {err}",))]  # fmt: skip
        for c in built:
            if kernel and kernel not in c.kernel:
                continue
            if quick and not c.quick:
                continue
            out.append(c)
    return out


def _check_not_interpreted() -> None:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("sm90_compile needs TRITON_INTERPRET unset before the kernel modules are imported")


# --------------------------------------------------------------------------------------------------------
# Compiling
# --------------------------------------------------------------------------------------------------------


def build_source(fn, args: dict, constexprs: dict):
    """An ``ASTSource`` for ``fn`` specialised as ``JITFunction.run`` would specialise ``args`` at a launch.

    The parameter list is the kernel's own (``fn.params``): a parameter missing from ``args``/``constexprs``,
    a name the kernel does not have, or a runtime value given for a constexpr (or the reverse) raises
    :class:`SignatureMismatch`.
    """
    import triton
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.nvidia.compiler import CUDABackend
    from triton.runtime.jit import JITFunction

    if not isinstance(fn, JITFunction):
        raise RuntimeError(f"{getattr(fn, '__name__', fn)} is not a JITFunction (imported under TRITON_INTERPRET?)")
    params = fn.params
    names = [p.name for p in params]
    const_names = {p.name for p in params if p.is_constexpr}
    problems = []
    for p in params:
        if p.is_constexpr and p.name not in constexprs:
            problems.append(f"constexpr {p.name} has no value")
        if not p.is_constexpr and p.name not in args:
            problems.append(f"argument {p.name} has no example value")
        if p.is_constexpr and p.name in args:
            problems.append(f"{p.name} is a constexpr but was given as a runtime argument")
        if not p.is_constexpr and p.name in constexprs:
            problems.append(f"{p.name} is a runtime argument but was given as a constexpr")
    problems += [f"{k} is not a parameter of the kernel" for k in {**args, **constexprs} if k not in names]
    if problems:
        raise SignatureMismatch(
            f"{fn.__name__}: the example table in benchmarks/sm90_compile.py does not match the kernel's parameters "
            f"({'; '.join(problems)})"
        )
    signature, consts, attrs = {}, {}, {}
    for i, p in enumerate(params):
        if p.name in const_names:
            signature[p.name] = "constexpr"
            consts[p.name] = constexprs[p.name]
            continue
        value = args[p.name]
        ty, spec = native_specialize_impl(
            CUDABackend, value, p.is_const, not p.do_not_specialize, not p.do_not_specialize_on_alignment
        )
        if p.annotation_type:
            # An annotated parameter keeps its declared type (floats and bools are never specialised).
            ty = p.annotation_type
            if ty == "u1" or ty[:2] in ("fp", "bf") or p.do_not_specialize:
                spec = None
        if ty == "constexpr":
            # An integer equal to 1 is baked in at a launch: compile that specialisation, not the generic one.
            signature[p.name] = "constexpr"
            consts[p.name] = spec
        else:
            signature[p.name] = ty
            if isinstance(spec, str) and spec:
                attrs[(i,)] = CUDABackend.parse_attr(spec)
    return triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=consts, attrs=attrs)


_PTXAS_REGS = re.compile(r"Used (\d+) registers")
_PTXAS_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_STACK = re.compile(r"(\d+) bytes stack frame")
_DOT = re.compile(r"=\s*(tt\.dot|ttng\.warp_group_dot)\s")


def compile_case(case: Case) -> dict:
    """Compile one case for sm_90; returns the row of the report (never raises for a compile error)."""
    row = dict(kernel=case.kernel, config=case.config, dtype=case.dtype, num_warps=case.num_warps,
               num_stages=case.num_stages, shared=None, regs=None, spill_stores=None, spill_loads=None,
               stack=None, dots=0, wgmma=0, dot_m=None, ptx_sha=None, seconds=None, status="FAIL", error=None,
               notes=list(case.notes))  # fmt: skip
    if case.fn is None:
        row["error"] = case.notes[0] if case.notes else "no kernel"
        row["notes"] = []
        return row
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget

    try:
        src = build_source(case.fn, case.args, case.constexprs)
    except SignatureMismatch as err:
        row["error"] = str(err)
        return row
    log = io.StringIO()
    t0 = time.perf_counter()
    try:
        with contextlib.redirect_stdout(log), warnings.catch_warnings():
            # The fp-fusion default warning of Triton 3.9: real launches pass no value either.
            warnings.filterwarnings("ignore", message=".*TRITON_DEFAULT_FP_FUSION.*")
            with knobs.nvidia.scope():
                knobs.nvidia.dump_ptxas_log = True  # ptxas already runs with -v; this prints its report
                cc = triton.compile(src, target=GPUTarget("cuda", TARGET_ARCH, 32),
                                    options={"num_warps": case.num_warps, "num_stages": case.num_stages})
    except Exception as err:  # noqa: BLE001 - a compile error is a result
        row["seconds"] = time.perf_counter() - t0
        msg = str(err).strip().splitlines()
        row["error"] = f"{type(err).__name__}: " + (" | ".join(line.strip() for line in msg[:6]) if msg else "")
        return row
    row["seconds"] = time.perf_counter() - t0
    row["shared"] = int(cc.metadata.shared)
    text = log.getvalue()
    if m := _PTXAS_REGS.search(text):
        row["regs"] = int(m.group(1))
    if m := _PTXAS_SPILL.search(text):
        row["spill_stores"], row["spill_loads"] = int(m.group(1)), int(m.group(2))
    if m := _PTXAS_STACK.search(text):
        row["stack"] = int(m.group(1))
    if row["regs"] is None:
        # A cache hit skips ptxas (and its report); main() uses a fresh cache so this is only for callers.
        row["notes"].append("no ptxas report (cache hit?)")
    # Two launch configurations that produce the same PTX are one kernel: an autotune list holding both
    # compiles and times it twice.
    row["ptx_sha"] = hashlib.sha1(cc.asm["ptx"].encode()).hexdigest()[:12]
    dots = _DOT.findall(cc.asm["ttgir"])
    row["dots"] = len(dots)
    row["wgmma"] = sum(d == "ttng.warp_group_dot" for d in dots)
    problems = []
    if row["shared"] > SHARED_LIMIT:
        problems.append(f"shared memory {row['shared']} B > {SHARED_LIMIT} B (227 KiB)")
    if problems:
        row["error"] = "; ".join(problems)
        return row
    if (row["spill_stores"] or 0) > 0:
        row["notes"].append(f"spills {row['spill_stores']} B")
    row["dot_m"] = case.dot_m
    if row["dots"] and row["wgmma"] < row["dots"]:
        m = case.dot_m
        row["notes"].append(f"mma.sync: dot M={m} < 64" if m is not None and m < 64 else "mma.sync, wgmma expected")
    row["status"] = "OK"
    return row


# --------------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------------


def _fmt(x, digits=None) -> str:
    if x is None:
        return "-"
    return f"{x:.{digits}f}" if digits is not None else str(x)


def _wgmma_cell(r: dict) -> str:
    if not r["dots"]:
        return "-" if r["status"] == "OK" else "?"
    return f"{'yes' if r['wgmma'] == r['dots'] else 'no' if r['wgmma'] == 0 else 'partly'} ({r['wgmma']}/{r['dots']})"


def _summary_lines(rows: list[dict]) -> list[str]:
    fails = [r for r in rows if r["status"] != "OK"]
    spills = [r for r in rows if (r["spill_stores"] or 0) > 0]
    heavy = [r for r in spills if r["spill_stores"] > HEAVY_SPILL_BYTES]
    no_wg = [r for r in rows if r["status"] == "OK" and r["dots"] and r["wgmma"] < r["dots"]]
    unexpected = [r for r in no_wg if r.get("dot_m") is None or r["dot_m"] >= 64]
    dups = [r for r in rows if any(n.startswith("same PTX as") for n in r["notes"])]
    worst = max((r for r in rows if r["shared"] is not None), key=lambda r: r["shared"], default=None)
    lines = [
        f"- {len(rows)} configurations, {len(rows) - len(fails)} OK, {len(fails)} FAIL.",
        f"- Register spills in {len(spills)} ({len(heavy)} above {HEAVY_SPILL_BYTES} bytes)"
        + (": " + "; ".join(f"{r['kernel']} {r['dtype']} {r['config']}: {r['spill_stores']} B"
                            for r in sorted(heavy, key=lambda r: -r["spill_stores"])[:12]) if heavy else "."),
        f"- tl.dot without wgmma in {len(no_wg)} configurations"
        + (" (kernels: " + ", ".join(sorted({r["kernel"] for r in no_wg})) + ")" if no_wg else "")
        + f"; {len(unexpected)} of them with dot tiles of M >= 64, where wgmma was expected"
        + (": " + "; ".join(f"{r['kernel']} {r['dtype']} {r['config']}" for r in unexpected[:12]) if unexpected
           else " (the others have M < 64, which wgmma cannot take)."),
    ]  # fmt: skip
    if dups:
        lines.append(f"- {len(dups)} configurations compile to the same PTX as an earlier one of the same kernel and "
                     "dtype (autotune candidates that differ only in name; see the notes).")
    if worst:
        where = f"{worst['kernel']} {worst['dtype']} {worst['config']}"
        lines.append(f"- Most shared memory: {worst['shared']} B ({where}), limit {SHARED_LIMIT} B.")
    for r in fails:
        lines.append(f"- FAIL {r['kernel']} {r['dtype']} {r['config']}: {r['error']}")
    return lines


def mark_duplicates(rows: list[dict]) -> None:
    """Note on each row whose PTX an earlier row of the same kernel and dtype already produced."""
    first: dict[tuple, str] = {}
    for r in rows:
        if r.get("ptx_sha") is None:
            continue
        key = (r["kernel"], r["dtype"], r["ptx_sha"])
        if key in first:
            r["notes"].append(f"same PTX as {first[key]}")
        else:
            first[key] = r["config"]


def markdown(rows: list[dict], *, wall_s: float, argv: list[str]) -> str:
    import triton
    from triton.backends.nvidia.compiler import get_ptxas_version

    try:
        ver = get_ptxas_version(TARGET_ARCH)
        m = re.search(r"release [\d.]+, (V[\d.]+)", ver)
        ptxas_ver = f"ptxas {m.group(1)}" if m else "ptxas " + ver.strip().splitlines()[-1]
    except Exception:  # noqa: BLE001 - the version is decoration
        ptxas_ver = "ptxas ?"
    cmd = "python benchmarks/sm90_compile.py" + (" " + " ".join(argv) if argv else "")
    head = [
        "# sm_90 compile check of the Triton kernels",
        "",
        "Compile-time only: every Triton kernel of tcopilot compiled for **sm_90a (H100/H200)** on a CPU-only",
        "machine (Triton's bundled ptxas), once per launch configuration its CUDA path uses (the kernels' tables,",
        "the log_attention autotune list, the flag combinations that matter). Nothing ran on a GPU and nothing",
        "is timed. Shared memory is Triton's `metadata.shared` (checked against the 227 KiB = 232448 bytes a",
        "block may use on H100/H200); registers and spill stores come from ptxas' `-v` report; *wgmma* counts",
        "the `tl.dot`s that became Hopper warp-group MMAs in the TTGIR (the rest lower to `mma.sync`).",
        "Arguments are specialised as at a real launch of a representative shape (16-byte aligned pointers,",
        "`tt.divisibility=16` on integers divisible by 16, integers equal to 1 baked in); a misaligned view",
        "would compile another variant. `*` marks the table default of an autotuned kernel",
        "(`TCOPILOT_AUTOTUNE=0`); the other rows of such a kernel are its autotune candidates, which a GPU run",
        "compiles and times too. Compile seconds are on a shared 2-core CPU.",
        "",
        "Example shapes: attention B=2, 32 query / 8 kv heads (GQA 4; `MHA`: 1), Lq=2048 against Lk=4096,",
        "head dims 64 and 128 (whole autotune list) and 256 (list in bf16, table otherwise); split-K decode",
        "B=4 against a 4096-entry cache, Lq x group packed into M rows (only the tiles the launcher routes there:",
        "fp32 sends M32/M64 at D=128 and all of D=256 to log_attention_fwd); logit_capture N=8192, V=128256",
        "(forward chunks of 160 rows, backward blocks 8192 x 2560); rectified_next_token B=32, V=128256;",
        "rectified_decode_head d=c=2048, V=128256, hidden states as `hidden[:, -1]` views.",
        "",
        f"Triton {triton.__version__}, {ptxas_ver}; target `cuda:{TARGET_ARCH}` (sm_90a). A GPU image with another",
        "Triton version compiles differently: rerun there (`--quick` takes under a minute).",
        f"{len(rows)} compilations in {wall_s:.0f} s. Rerun: `{cmd}` (`--quick`: one configuration per kernel;",
        "`--kernel NAME`: kernels whose name contains NAME; `--jobs N`; `--json PATH`: the rows as JSON).",
        "",
        "## Summary",
        "",
        *_summary_lines(rows),
        "",
        "## Results",
        "",
        "| kernel | config | dtype | shared B | regs | spill B | wgmma | compile s | status |",
        "|---|---|---|---:|---:|---:|---|---:|---|",
    ]
    body = []
    for r in rows:
        cfg = r["config"] + (" *" if any(n.startswith("table") for n in r["notes"]) else "")
        extra = [n for n in r["notes"] if not n.startswith("table") and not n.startswith("spills")]
        status = r["status"] if r["status"] == "OK" else f"FAIL: {r['error']}"
        if extra:
            status += " (" + "; ".join(extra) + ")"
        spill = _fmt(r["spill_stores"])
        body.append(
            f"| {r['kernel']} | {cfg} | {r['dtype']} | {_fmt(r['shared'])} | {_fmt(r['regs'])} | {spill} | "
            f"{_wgmma_cell(r)} | {_fmt(r['seconds'], 1)} | {status.replace('|', '/')} |"
        )
    return "\n".join(head + body) + "\n"


def _worker_init() -> None:
    os.environ.pop("TRITON_INTERPRET", None)


def _case_key(c: Case) -> tuple:
    return (c.kernel, c.config, c.dtype)


def _compile_in_worker(key: tuple, quick: bool, kernel: str | None) -> dict:
    # Cases hold JITFunctions, which do not pickle: a worker rebuilds the list and picks its case by key.
    for c in cases(quick=quick, kernel=kernel):
        if _case_key(c) == key:
            return compile_case(c)
    raise KeyError(key)


def run(quick: bool = False, kernel: str | None = None, jobs: int = 1, progress=print) -> list[dict]:
    """Compile the selected cases (``jobs`` processes); returns the report rows in case order."""
    todo = cases(quick=quick, kernel=kernel)
    rows: list[dict] = []
    if jobs <= 1:
        for i, c in enumerate(todo, 1):
            r = compile_case(c)
            rows.append(r)
            progress(_progress_line(i, len(todo), r))
    else:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(max_workers=jobs, initializer=_worker_init) as pool:
            futs = [pool.submit(_compile_in_worker, _case_key(c), quick, kernel) for c in todo]
            for i, f in enumerate(futs, 1):
                r = f.result()
                rows.append(r)
                progress(_progress_line(i, len(todo), r))
    mark_duplicates(rows)
    return rows


def _progress_line(i: int, n: int, r: dict) -> str:
    what = f"[{i}/{n}] {r['kernel']} {r['dtype']} {r['config']}"
    if r["status"] != "OK":
        return f"{what}: FAIL {r['error']}"
    return (f"{what}: shared {r['shared']} regs {_fmt(r['regs'])} spill {_fmt(r['spill_stores'])} "
            f"wgmma {_wgmma_cell(r)} {r['seconds']:.1f}s")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--kernel", help="only kernels whose name contains this (e.g. log_attention_bwd)")
    ap.add_argument("--quick", action="store_true", help="one representative configuration per kernel")
    ap.add_argument("--out", default=str(DEFAULT_OUT), help=f"Markdown report (default {DEFAULT_OUT})")
    ap.add_argument("--json", help="also write the rows as JSON here")
    ap.add_argument("--jobs", type=int, default=1, help="parallel compilations (default 1)")
    args = ap.parse_args(argv)

    # Kernels must be JITFunctions: the interpreter flag must be off before the kernel modules are imported.
    os.environ.pop("TRITON_INTERPRET", None)
    sys.path.insert(0, str(ROOT))
    if ptxas_path() is None:
        print("sm90_compile: no ptxas for sm_90 found (Triton's NVIDIA backend ships one)", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    # A fresh Triton cache unless the caller chose one: a cache hit would skip ptxas and its report.
    with tempfile.TemporaryDirectory(prefix="sm90-cache-") as tmp:
        if "TRITON_CACHE_DIR" not in os.environ:
            os.environ["TRITON_CACHE_DIR"] = tmp
        rows = run(quick=args.quick, kernel=args.kernel, jobs=args.jobs, progress=lambda s: print(s, flush=True))
    wall = time.perf_counter() - t0
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(markdown(rows, wall_s=wall, argv=_clean_argv(argv)))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    print("\n".join(_summary_lines(rows)))
    print(f"wrote {out} ({len(rows)} compilations, {wall:.0f} s)")
    return 1 if any(r["status"] != "OK" for r in rows) else 0


def _clean_argv(argv: list[str]) -> list[str]:
    # The rerun command in the report: drop output paths, which are this run's own.
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a in ("--out", "--json"):
            skip = True
            continue
        if a.startswith(("--out=", "--json=")):
            continue
        out.append(a)
    return out


if __name__ == "__main__":
    sys.exit(main())
