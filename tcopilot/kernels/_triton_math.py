"""Small ``@triton.jit`` math helpers shared by several kernels."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def softcap(z, cap):
    """``cap * tanh(z / cap)``: in fp32 accurate to a few ulp of the result at every ``z``.

    Written without libdevice's tanh, which the interpreter and older Triton versions lack. The textbook
    ``(1 - t) / (1 + t)`` with ``t = exp(-2|x|)`` loses the low bits of ``1 - t`` when ``|x|`` is small: an
    absolute error of ~``cap * 3e-8`` on every capped logit, however small (1e-6 at cap 30, 3e-4 at 1e4).
    So ``|x| < 0.25`` uses the odd Taylor series to ``x**11`` (truncation below 1e-9 relative), and larger
    ``|x|`` the exp form, where ``1 - t >= 0.39`` keeps the rounding to a few ulp. ``exp(-2|x|) <= 1``
    never overflows; ``z = -inf`` (masked lanes) gives ``-cap``: callers re-mask.
    """
    x = z / cap
    a = tl.abs(x)
    t = tl.exp(-2.0 * a)
    big = (1.0 - t) / (1.0 + t)
    if z.dtype == tl.float64:  # the exp form's absolute error is ~cap * 1e-16 there; the series is fp32-exact
        return cap * tl.where(x >= 0, big, -big)
    x2 = tl.minimum(a, 0.25) * tl.minimum(a, 0.25)  # the series is used below 0.25 only: no overflow
    # tanh a = a (1 - a^2/3 + 2a^4/15 - 17a^6/315 + 62a^8/2835 - 1382a^10/155925), Horner in a^2
    poly = -1382.0 / 155925.0
    poly = poly * x2 + 62.0 / 2835.0
    poly = poly * x2 - 17.0 / 315.0
    poly = poly * x2 + 2.0 / 15.0
    poly = poly * x2 - 1.0 / 3.0
    small = a + a * (x2 * poly)
    th = tl.where(a < 0.25, small, big)
    return cap * tl.where(x >= 0, th, -th)
