"""Compiled (numba) inner loops of the snapshot codec: one pass per block instead of ~15 numpy
passes, so a restore is bound by the disk rather than by decoding. Same results as the numpy
code in codec.py bit for bit (tests run both); codec.py falls back to numpy without numba.

Kernels release the GIL (`nogil`), so the store decodes segments on several threads.
"""

from __future__ import annotations

import math

import numba
import numpy as np


@numba.njit(cache=True, nogil=True)
def quantize_rows(
    x, xbits, w, ebits, mbits, bias, max_code, max_f, max_e, table, pow2, codes, e8, ok, bf_ok
):
    """Block-quantize float32 rows x [n, d] (xbits: its uint32 view) in column blocks of w.

    Writes codes [n, nb, w] (unpacked), e8 [n, nb], ok [n, nb] (exact round trip) and
    bf_ok [n, nb] (every value a bfloat16).
    """
    n = x.shape[0]
    nb = codes.shape[1]
    sub_scale = 2.0 ** (bias - 1 + mbits)
    min_normal = 2.0 ** (1 - bias)
    sign_shift = ebits + mbits
    for i in range(n):
        for j in range(nb):
            base = j * w
            amax = 0.0
            finite = True
            bfo = True
            for k in range(w):
                a = abs(np.float64(x[i, base + k]))
                if not (a <= 3.5e38):
                    finite = False
                elif a > amax:
                    amax = a
                if xbits[i, base + k] & 0xFFFF:
                    bfo = False
            bf_ok[i, j] = bfo
            if not finite:
                ok[i, j] = False
                e8[i, j] = 127
                for k in range(w):
                    codes[i, j, k] = 0
                continue
            kk = 0
            if amax > 0.0:
                m, e = math.frexp(amax)
                kk = e - max_e if m <= max_f else e - max_e + 1
                kk = min(max(kk, -127), 127)
            e8[i, j] = kk + 127
            scale = pow2[kk + 127]
            good = True
            for k in range(w):
                v = x[i, base + k]
                neg = xbits[i, base + k] >> 31
                s = abs(math.ldexp(np.float64(v), -kk))
                if s >= min_normal:
                    m, e = math.frexp(s)
                    mag = ((e - 1 + bias) << mbits) | int((2.0 * m - 1.0) * (1 << mbits))
                else:
                    mag = int(round(s * sub_scale))
                mag = min(max(mag, 0), max_code)
                code = mag | (neg << sign_shift)
                codes[i, j, k] = code
                dec = table[code] * scale
                if dec != v or (dec == 0.0 and math.copysign(1.0, dec) != math.copysign(1.0, v)):
                    good = False
            ok[i, j] = good


@numba.njit(cache=True, nogil=True)
def dequantize_rows(codes, e8, cols, w, nibbles, table, pow2, out):
    """Row r of the encoding goes to out[r // m, r % m] (out is [L, m, d], any strides):
    out[.., cols[j]·w + k] = table[code] · 2^(e8 − 127); codes packed two per byte if nibbles."""
    m = out.shape[1]
    nq = e8.shape[1]
    for r in range(e8.shape[0]):
        row = out[r // m, r % m]
        for j in range(nq):
            scale = pow2[e8[r, j]]
            base = cols[j] * w
            cj = codes[r, j]
            if nibbles:
                for k in range(w // 2):
                    b = cj[k]
                    row[base + 2 * k] = table[b & 15] * scale
                    row[base + 2 * k + 1] = table[b >> 4] * scale
            else:
                for k in range(w):
                    row[base + k] = table[cj[k]] * scale
