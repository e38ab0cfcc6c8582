"""Input checks shared by every public op.

Errors are part of the API: each check raises a ``ValueError`` that names the argument, what was
expected and what was received, so a user never meets a silent NaN or a crash deep inside a kernel.
"""

from __future__ import annotations

import math
import numbers
import os
import struct
from collections.abc import Sequence

import numpy as np
import torch

IMPLS = ("auto", "torch", "triton")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_tensor(
    name: str,
    t,
    *,
    ndim: int | None = None,
    dtypes: Sequence[torch.dtype] | None = None,
    device: torch.device | None = None,
    shape: Sequence[int | None] | None = None,
    allow_empty: bool = False,
) -> torch.Tensor:
    """Check that ``t`` is a tensor of the given rank, dtype, device and shape (``None`` = any size)."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name}: expected a {ndim}-d tensor, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise ValueError(f"{name}: expected dtype in ({names}), got {str(t.dtype).replace('torch.', '')}")
    if device is not None and t.device != device:
        raise ValueError(f"{name}: expected a tensor on {device} (like the other inputs), got {t.device}")
    if shape is not None:
        if len(shape) != t.dim() or any(s is not None and s != r for s, r in zip(shape, t.shape)):
            want = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
            raise ValueError(f"{name}: expected shape {want}, got {list(t.shape)}")
    if not allow_empty and t.numel() == 0:
        raise ValueError(f"{name}: expected a non-empty tensor, got shape {tuple(t.shape)}")
    return t


LABEL_CHECK_DTYPES = (torch.int64, torch.int32, torch.int16, torch.uint8)


def label_extrema(labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """``[2]`` int64 tensor on ``labels``' device, no host read: the smallest and the largest label other than
    ``ignore_index``; ``(dtype max, dtype min)`` (so ``lo > hi``) when every label is ``ignore_index``.

    An ``ignore_index`` outside the labels' dtype (``-100`` for uint8) equals no label: it is not compared, since
    the comparison would wrap it into the dtype (uint8 ``156 == -100``). ``labels`` must be non-empty.
    """
    info = torch.iinfo(labels.dtype)
    if info.min <= ignore_index <= info.max:
        valid = labels != ignore_index
        lo = torch.where(valid, labels, info.max).amin()
        hi = torch.where(valid, labels, info.min).amax()
    else:
        lo, hi = torch.aminmax(labels)
    return torch.stack([lo, hi]).long()


def check_label_extrema(name: str, lo: int, hi: int, num_classes: int, ignore_index: int) -> None:
    """Raise the ValueError of :func:`check_labels` for the host values of :func:`label_extrema`."""
    if lo <= hi and (lo < 0 or hi >= num_classes):
        raise ValueError(
            f"{name}: expected values in [0, {num_classes}) or ignore_index={ignore_index}, got {lo if lo < 0 else hi}"
        )


def check_labels(name: str, labels: torch.Tensor, num_classes: int, ignore_index: int) -> None:
    """Labels must be integer and in ``[0, num_classes)`` or equal to ``ignore_index``: one host read (a
    synchronisation on an accelerator), none for empty labels."""
    if labels.dtype not in LABEL_CHECK_DTYPES:
        raise ValueError(f"{name}: expected an integer tensor, got {labels.dtype}")
    if labels.numel() == 0:
        return
    lo, hi = label_extrema(labels, ignore_index).tolist()
    check_label_extrema(name, lo, hi, num_classes, ignore_index)


# One-element tensors whose value :func:`scalar_as_int64` packs exactly into an int64 (an integer, or the bits of a
# float64), so that it travels with other int64 values in one host read.
_PACKED_INTS = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


def scalar_as_int64(t: torch.Tensor) -> torch.Tensor | None:
    """``[1]`` int64 tensor on ``t``'s device that holds the value of the one-element tensor ``t`` exactly (an integer
    as itself, a float as the bits of its float64 value), no host read; ``None`` for other tensors (several elements,
    bool, complex, wide unsigned). :func:`int64_as_scalar` turns the value read back into what ``t.item()`` gives,
    so a caller can read ``t`` together with other int64 values (one ``torch.cat(...).tolist()``)."""
    if t.numel() != 1:
        return None
    if t.dtype in _PACKED_INTS:
        return t.reshape(1).long()
    if t.dtype in FLOAT_DTYPES:
        return t.reshape(1).double().view(torch.int64)
    return None


def int64_as_scalar(value: int, dtype: torch.dtype) -> int | float:
    """The Python number ``t.item()`` gives for a tensor ``t`` of ``dtype``, from the host value of
    :func:`scalar_as_int64` ``(t)``."""
    if dtype in FLOAT_DTYPES:
        return struct.unpack("<d", struct.pack("<q", value))[0]
    return value


def check_finite(name: str, value: float) -> float:
    if isinstance(value, (torch.SymFloat, torch.SymInt)) or torch.compiler.is_compiling():
        # torch.compile(dynamic=True) traces Python numbers as symbols, and math.isfinite on a symbol cannot be
        # traced: while compiling, only the type is checked (eager calls check the value).
        if isinstance(value, bool) or not isinstance(value, (int, float, torch.SymFloat, torch.SymInt)):
            raise ValueError(f"{name}: expected a finite number, got {value!r}")
        return value
    # numbers.Real: Python and numpy floats and ints (np.float32(0.5), np.int64(3)); not bools, not tensors.
    if not is_finite_number(value):
        raise ValueError(f"{name}: expected a finite number, got {_shown(value)}")
    return float(value)


def _is_number(value) -> bool:
    # numpy's bool is no numbers.Real; Python's bool is (an int subclass): excluded by name.
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def is_finite_number(value) -> bool:
    """A finite real number (Python or numpy; not a bool, not a tensor, not an int past the float range)."""
    return _is_number(value) and _isfinite(value)


def _shown(value) -> str:
    shown = repr(value)
    return shown if len(shown) <= 60 else f"{shown[:24]}...({len(shown)} characters)"


def check_bool(name: str, value, what: str = "a bool") -> bool:
    """A flag as a Python bool: ``bool`` or ``numpy.bool_`` (no bool subclass) only; ``bool("no")`` would be True."""
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name}: expected {what}, got {value!r}")
    return bool(value)


def check_int(name: str, value, *, low: int | None = None, high: int | None = None, what: str = "an int") -> int:
    """An integer option as a Python int: ``numbers.Integral`` (Python and numpy ints, not bools), within int64
    (it meets int64 tensors) and within ``[low, high]`` when given. ``what`` words the expectation."""
    lo = -(2**63) if low is None else low
    hi = 2**63 - 1 if high is None else high
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or not lo <= value <= hi:
        raise ValueError(f"{name}: expected {what}, got {_shown(value)}")
    return int(value)


def _isfinite(value: int | float) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an int beyond the float range (10**400)
        return False


FLOAT32_MAX = float(torch.finfo(torch.float32).max)
FLOAT32_TINY = float(torch.finfo(torch.float32).tiny)


def check_float32_range(name: str, value: float) -> float:
    """A finite number that the fp32 arithmetic of a kernel can hold (|value| <= 3.4e38)."""
    if abs(value) > FLOAT32_MAX:
        raise ValueError(
            f"{name}: expected a number representable in float32 (|x| <= {FLOAT32_MAX:.4g}), the precision "
            f"this op computes in; got {value!r}"
        )
    return value


def check_choice(name: str, value, choices: Sequence[str]) -> None:
    # names as str (np.str_ is one): torch.float32, a list or an array is refused with the same message
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name}: expected one of {tuple(choices)}, got {value!r}")


def triton_usable(device: torch.device) -> bool:
    """Triton kernels run on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1``."""
    if device.type == "cuda":
        return True
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve_impl(impl: str, device: torch.device, op: str, *, triton_available: bool = True) -> str:
    """Turn ``impl`` into ``"torch"`` or ``"triton"``.

    ``"auto"`` picks Triton on CUDA tensors (when the op has a kernel) and the PyTorch path otherwise.
    An explicit ``impl`` never falls back silently: ``impl="triton"`` on an unusable device raises.
    """
    check_choice("impl", impl, IMPLS)
    if impl == "auto":
        return "triton" if (triton_available and device.type == "cuda") else "torch"
    if impl == "triton":
        if not triton_available:
            raise NotImplementedError(
                f"{op}: impl='triton' is not implemented yet; use impl='torch' (or 'auto')"
            )
        if not triton_usable(device):
            raise ValueError(
                f"impl: 'triton' needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors), "
                f"got tensors on {device}"
            )
    return impl
