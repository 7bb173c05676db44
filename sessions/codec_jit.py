"""Compiled (numba) inner loops of the snapshot codec: one pass per block instead of ~15 numpy
passes, so a restore is bound by the disk rather than by decoding. Same results as the numpy
code in codec.py bit for bit (tests run both); codec.py falls back to numpy without numba.

Kernels release the GIL (`nogil`), so the store decodes segments on several threads.
"""

from __future__ import annotations

import numba
import numpy as np


@numba.njit(cache=True, nogil=True)
def quantize_rows(
    x, xbits, w, ebits, mbits, bias, max_code, max_bits, table, pow2, codes, e8, ok, bf_ok
):
    """Block-quantize float32 rows x [n, d] (xbits: its uint32 view) in column blocks of w.

    Pure integer work on the float32 bit patterns. Writes codes [n, nb, w] (unpacked), e8
    [n, nb], ok [n, nb] (the block decodes back bit for bit; checked by decoding) and bf_ok
    [n, nb] (every value is a bfloat16). `max_bits` is the float32 pattern of the largest code.
    """
    n = x.shape[0]
    nb = codes.shape[1]
    sign_shift = ebits + mbits
    drop = 23 - mbits
    max_e = (max_bits >> 23) - 127
    max_m = max_bits & 0x7FFFFF
    min_normal_e = 1 - bias  # unbiased exponent of the smallest normal code
    for i in range(n):
        for j in range(nb):
            base = j * w
            amax = np.uint32(0)
            bfo = True
            for k in range(w):
                b = xbits[i, base + k]
                a = b & np.uint32(0x7FFFFFFF)
                if a > amax:
                    amax = a
                if b & np.uint32(0xFFFF):
                    bfo = False
            bf_ok[i, j] = bfo
            ae = np.int64(amax >> 23)
            if ae == 255 or (ae == 0 and amax != 0):  # NaN, inf or float32 subnormals: no
                ok[i, j] = False
                e8[i, j] = 127
                for k in range(w):
                    codes[i, j, k] = 0
                continue
            kk = 0
            if amax != 0:  # smallest k with amax <= max_value * 2^k
                kk = (ae - 127) - max_e + (1 if (amax & 0x7FFFFF) > max_m else 0)
                kk = min(max(kk, -127), 127)
            e8[i, j] = kk + 127
            scale = pow2[kk + 127]
            good = True
            for k in range(w):
                b = xbits[i, base + k]
                neg = np.int64(b >> 31)
                a = b & np.uint32(0x7FFFFFFF)
                mag = 0
                if a != 0:
                    ve = np.int64(a >> 23)
                    if ve == 0:
                        good = False
                    else:
                        se = ve - 127 - kk  # exponent after scaling by 2^-k
                        sig = np.int64(a & 0x7FFFFF) | 0x800000
                        if se >= min_normal_e:
                            mag = ((se + bias) << mbits) | ((sig & 0x7FFFFF) >> drop)
                        else:  # a subnormal code: sig · 2^(se − 23) in units of 2^(min_normal_e − mbits)
                            shift = drop + (min_normal_e - se)
                            mag = sig >> shift if shift < 63 else 0
                        if mag > max_code:
                            mag = max_code
                            good = False
                code = mag | (neg << sign_shift)
                codes[i, j, k] = code
                dec = table[code] * scale
                if dec != x[i, base + k] or (dec == 0.0 and (code >> sign_shift) != neg):
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
