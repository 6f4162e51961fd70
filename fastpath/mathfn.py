"""exp and tanh written out as arithmetic, so that a loop calling them vectorises.

Inside a Numba loop, `math.exp` and `math.tanh` are calls into libm, one element at a
time: measured here, 3-8 ns (exp) and 18-22 ns (tanh) per element, against 0.6 / 0.9 ns
(float32) and 1.4 / 3.0 ns (float64) for the versions below, which LLVM turns into AVX2
code (NumPy's own: 1.7-2.1 / 2.7 ns float32). That scalar tanh is what made a naive fused
attention kernel slower than NumPy. Small changes can stop the vectorisation: a float32
tanh that called exp for the saturated range ran at 8.4 ns, and took 2/3 of the attention
forward; `fastpath.bench` and a loop timing are the only way to know.

    exp(x)  = 2^n * e^r,  n = round(x / ln 2),  r = x - n ln 2 (ln 2 in two parts, Cody-Waite),
              e^r from a polynomial (float32, Cephes expf) or a rational function (float64,
              Cephes exp); 2^n is built directly in the exponent bits.
    tanh(x) float32: a 13/6 odd/even rational function of x clamped to +-7.905 (Eigen's
              generic_fast_tanh_float), x itself below 4e-4, and exactly +-1 from |x| = 9.011
              on, where float32 tanh rounds to 1 (the clamped rational function would stay
              1.2e-7 short of 1, and the softcap's slope 1 - tanh^2 would not reach 0).
    tanh(x) float64: x + x^3 P(x^2)/Q(x^2) for |x| <= 0.625 (Cephes tanh), else
              1 - 2 / (exp(2|x|) + 1) with the sign of x.

Accuracy (tests/fastpath/test_fastpath.py measures it against NumPy): exp within 2 ulp, tanh
within 5 ulp (float32) and 2 ulp (float64). exp clamps its argument to the normal range
of the type: exp(-inf) is the smallest normal number, not 0, so callers zero masked
entries themselves (the attention kernels do).

`exp(x)` and `tanh(x)` dispatch on the scalar type, in compiled code (an overload) and in
plain Python (NUMBA_DISABLE_JIT=1) alike.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic, overload

from .jit import MATH_FASTMATH, jit_enabled, kernel

# ---------------------------------------------------------------------------- bits -> float


def _py_int32_as_float32(i):
    return np.int32(i).view(np.float32)


def _py_int64_as_float64(i):
    return np.int64(i).view(np.float64)


@intrinsic
def _int32_as_float32(typingctx, i):
    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], ir.FloatType())
    return types.float32(types.int32), codegen


@intrinsic
def _int64_as_float64(typingctx, i):
    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], ir.DoubleType())
    return types.float64(types.int64), codegen


if not jit_enabled():        # an intrinsic cannot run as Python: use NumPy's view instead
    _int32_as_float32 = _py_int32_as_float32      # noqa: F811
    _int64_as_float64 = _py_int64_as_float64      # noqa: F811

# ---------------------------------------------------------------------------- float32

_f = np.float32
_LOG2E_32, _LN2_HI_32, _LN2_LO_32 = _f(1.44269504088896341), _f(0.693359375), _f(-2.12194440e-4)
_EP32 = [_f(c) for c in (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3,
                          4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1)]
_E0, _E1, _E2, _E3, _E4, _E5 = _EP32
_EXP_LO_32, _EXP_HI_32 = _f(-87.33654), _f(88.37626)
_HALF_32, _ONE_32, _TWO_32 = _f(0.5), _f(1.0), _f(2.0)
_TA = [_f(c) for c in (4.89352455891786e-03, 6.37261928875436e-04, 1.48572235717979e-05,
                       5.12229709037114e-08, -8.60467152213735e-11, 2.00018790482477e-13,
                       -2.76076847742355e-16)]
_A1, _A3, _A5, _A7, _A9, _A11, _A13 = _TA
_TB = [_f(c) for c in (4.89352518554385e-03, 2.26843463243900e-03, 1.18534705686654e-04,
                       1.19825839466702e-06)]
_B0, _B2, _B4, _B6 = _TB
_TANH_CLAMP_32, _TANH_TINY_32, _TANH_ONE_32 = _f(7.90531110763549805), _f(0.0004), _f(9.01092)


@kernel(fastmath=MATH_FASTMATH)
def exp32(x):
    x = min(max(x, _EXP_LO_32), _EXP_HI_32)
    n = np.floor(x * _LOG2E_32 + _HALF_32)
    r = x - n * _LN2_HI_32
    r = r - n * _LN2_LO_32                                    # r in [-ln2/2, ln2/2]
    p = (((((_E0 * r + _E1) * r + _E2) * r + _E3) * r + _E4) * r + _E5) * r * r + r + _ONE_32
    return p * _int32_as_float32((np.int32(n) + np.int32(127)) << np.int32(23))   # p * 2^n


@kernel(fastmath=MATH_FASTMATH)
def tanh32(x):
    a = abs(x)
    c = min(max(x, -_TANH_CLAMP_32), _TANH_CLAMP_32)
    c2 = c * c
    p = ((((((_A13 * c2 + _A11) * c2 + _A9) * c2 + _A7) * c2 + _A5) * c2 + _A3) * c2 + _A1) * c
    q = ((_B6 * c2 + _B4) * c2 + _B2) * c2 + _B0
    t = p / q                                                 # 1 - 1.2e-7 at the clamp
    t = t if a < _TANH_ONE_32 else (_ONE_32 if x > 0 else -_ONE_32)   # float32 tanh rounds to 1 there
    return x if a < _TANH_TINY_32 else t


# ---------------------------------------------------------------------------- float64


_LOG2E_64, _LN2_HI_64, _LN2_LO_64 = 1.4426950408889634073599, 6.93145751953125e-1, 1.42860682030941723212e-6
_P0, _P1, _P2 = 1.26177193074810590878e-4, 3.02994407707441961300e-2, 9.99999999999999999910e-1
_Q0, _Q1, _Q2, _Q3 = 3.00198505138664455042e-6, 2.52448340349684104192e-3, 2.27265548208155028766e-1, 2.0
_TP0, _TP1, _TP2 = -9.64399179425052238628e-1, -9.92877231001918586564e1, -1.61468768441708447952e3
_TQ0, _TQ1, _TQ2 = 1.12811678491632931402e2, 2.23548839060100448583e3, 4.84406305325125486048e3


@kernel(fastmath=MATH_FASTMATH)
def exp64(x):
    x = min(max(x, -708.0), 709.0)
    n = np.floor(x * _LOG2E_64 + 0.5)
    r = x - n * _LN2_HI_64
    r = r - n * _LN2_LO_64
    rr = r * r
    px = r * ((_P0 * rr + _P1) * rr + _P2)
    e = 1.0 + 2.0 * (px / (((_Q0 * rr + _Q1) * rr + _Q2) * rr + _Q3 - px))    # e^r, Pade form
    # n through int32: AVX2 converts double -> int32 in vectors, double -> int64 only one by one
    return e * _int64_as_float64((np.int64(np.int32(n)) + np.int64(1023)) << np.int64(52))


@kernel(fastmath=MATH_FASTMATH)
def tanh64(x):
    a = min(abs(x), 20.0)
    big = 1.0 - 2.0 / (exp64(2.0 * a) + 1.0)
    big = big if x >= 0 else -big
    s = x * x
    small = x + x * s * (((_TP0 * s + _TP1) * s + _TP2) / (((s + _TQ0) * s + _TQ1) * s + _TQ2))
    return small if a <= 0.625 else big

# ---------------------------------------------------------------------------- dispatch


def exp(x):
    """e^x for a float32 or float64 scalar (see the module notes on accuracy and -inf)."""
    return exp32(x) if isinstance(x, np.float32) else exp64(x)


def tanh(x):
    """tanh(x) for a float32 or float64 scalar."""
    return tanh32(x) if isinstance(x, np.float32) else tanh64(x)


@overload(exp, jit_options={"fastmath": set(MATH_FASTMATH), "error_model": "numpy"})
def _exp_overload(x):
    if x == types.float32:
        return lambda x: exp32(x)
    return lambda x: exp64(x)


@overload(tanh, jit_options={"fastmath": set(MATH_FASTMATH), "error_model": "numpy"})
def _tanh_overload(x):
    if x == types.float32:
        return lambda x: tanh32(x)
    return lambda x: tanh64(x)
