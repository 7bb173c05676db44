"""Compiled (numba) inner loops of the snapshot codec: one pass per block instead of ~15 numpy
passes, so a restore is bound by the disk rather than by decoding. Same results as the numpy
code in codec.py bit for bit (tests run both); codec.py falls back to numpy without numba.

Kernels release the GIL (`nogil`), so the store decodes segments on several threads.
"""

from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir
from numba.core import types
from numba.extending import intrinsic


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


# Decoding of encoded row stacks straight into their final place (see codec.decode_rows_into).
#
# A q code becomes a float without a table: its magnitude bits, shifted so that the code's
# exponent field lands in float32's, read as a float32 are the code's value times
# 2^(bias − 127) — also for the code's subnormals, which come out as float32 subnormals with
# exactly the right significand. Two exact power-of-two products (2^(127 − bias), then the
# block's 2^(e8 − 127)) give table[code] · scale bit for bit, and this form vectorises where a
# table lookup does not. Codes above max_code (e4m3's NaN code) are never written (the
# encoders clamp to max_code) and are not special-cased: checking for them would cost as much
# as the decode itself, and the checksums keep such bytes out anyway.
#
# The two real formats get kernels of their own with loops of constant length and constant
# masks, which the compiler unrolls and vectorises: about 2x the speed of a table lookup, and
# a format branch inside the row loop alone would cost half of that. Destinations are sliced
# before the loops: indices that are provably non-negative spare numba's negative-index
# wrap-around, which also stops vectorisation.


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _copy_other_modes(row, rowb, r, bf, bcols, fl, fcols, tail, w):
    """bfloat16 blocks widened by a shift of their bits; float32 blocks and the last partial
    block copied."""
    for j in range(bcols.shape[0]):
        dstb = rowb[bcols[j] * w : bcols[j] * w + w]
        src = bf[r, j]
        for k in range(w):
            dstb[k] = np.uint32(src[k]) << 16
    for j in range(fcols.shape[0]):
        dst = row[fcols[j] * w : fcols[j] * w + w]
        src32 = fl[r, j]
        for k in range(w):
            dst[k] = src32[k]
    dt = tail.shape[1]
    if dt:
        d = row.shape[0]
        dst = row[d - dt : d]
        src32 = tail[r]
        for k in range(dt):
            dst[k] = src32[k]


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _rows_per_layer(out, q_e8, bf, fl, tail, nq, nbf, nf):
    n = q_e8.shape[0] if nq else (bf.shape[0] if nbf else (fl.shape[0] if nf else tail.shape[0]))
    return n // out.shape[0]


@numba.njit(cache=True, nogil=True, error_model="numpy")
def decode_e4m3(q_codes, q_e8, qcols, bf, bcols, fl, fcols, tail, pow2, out, r0):
    """Encoded row r = l·m + i → out[l, r0 + i] (out: C-contiguous float32 [L, R, d]).
    e4m3 codes in blocks of 64; empty arrays stand for absent modes."""
    nq = qcols.shape[0]
    m = _rows_per_layer(out, q_e8, bf, fl, tail, nq, bcols.shape[0], fcols.shape[0])
    bits = out.view(np.uint32)
    scratch = np.empty(64, np.uint32)
    as_float = scratch.view(np.float32)
    for l in range(out.shape[0]):
        for i in range(m):
            r = l * m + i
            row = out[l, r0 + i]
            for j in range(nq):
                scale = pow2[q_e8[r, j]]
                dst = row[qcols[j] * 64 : qcols[j] * 64 + 64]
                cj = q_codes[r, j]
                for k in range(64):
                    c = np.uint32(cj[k])
                    scratch[k] = ((c & 0x7F) << 20) | ((c & 0x80) << 24)
                for k in range(64):
                    dst[k] = as_float[k] * np.float32(2.0**120) * scale
            _copy_other_modes(row, bits[l, r0 + i], r, bf, bcols, fl, fcols, tail, 64)


@intrinsic
def _half_to_float(typingctx, bits):
    """float16 bit pattern (uint16) → float32, exact (LLVM's fpext: one vcvtph2ps per 8 lanes
    with F16C); numba has no float16 type of its own on the CPU."""
    if bits != types.uint16:
        return None

    def codegen(context, builder, signature, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

    return types.float32(types.uint16), codegen


@numba.njit(cache=True, nogil=True, error_model="numpy")
def decode_e4m3_f16(q_codes, q_e8, qcols, bf, bcols, fl, fcols, tail, pow2, out, r0):
    """decode_e4m3 through float16: an e4m3 code's bits, shifted into float16's fields
    (float16 has one more exponent bit and a bias of 15), are the code's value times 2^-8,
    e4m3 subnormals included, and the float16 → float32 conversion is exact. The converted
    value is a normal float32, unlike the shifted-code form of decode_e4m3, whose subnormal
    codes (a few % of real codes) send the product to the CPU's slow micro-coded path; with
    the conversion in hardware this is about 2x decode_e4m3. The product with
    2^8 · 2^(e8 − 127) is exact as one factor for e8 <= 246 (else two exact-then-rounded
    products, as in decode_e4m3), so the result is table[code] · scale bit for bit."""
    nq = qcols.shape[0]
    m = _rows_per_layer(out, q_e8, bf, fl, tail, nq, bcols.shape[0], fcols.shape[0])
    bits = out.view(np.uint32)
    for l in range(out.shape[0]):
        for i in range(m):
            r = l * m + i
            row = out[l, r0 + i]
            for j in range(nq):
                e8 = q_e8[r, j]
                dst = row[qcols[j] * 64 : qcols[j] * 64 + 64]
                cj = q_codes[r, j]
                if e8 <= 246:
                    factor = pow2[e8] * np.float32(256.0)
                    for k in range(64):
                        c = np.uint16(cj[k])
                        h = ((c & np.uint16(0x7F)) << np.uint16(7)) | (
                            (c & np.uint16(0x80)) << np.uint16(8)
                        )
                        dst[k] = _half_to_float(np.uint16(h)) * factor
                else:
                    scale = pow2[e8]
                    for k in range(64):
                        c = np.uint16(cj[k])
                        h = ((c & np.uint16(0x7F)) << np.uint16(7)) | (
                            (c & np.uint16(0x80)) << np.uint16(8)
                        )
                        dst[k] = _half_to_float(np.uint16(h)) * np.float32(256.0) * scale
            _copy_other_modes(row, bits[l, r0 + i], r, bf, bcols, fl, fcols, tail, 64)


@numba.njit(cache=True, nogil=True, error_model="numpy")
def decode_e2m1(q_codes, q_e8, qcols, bf, bcols, fl, fcols, tail, pairs, pow2, out, r0):
    """As decode_e4m3 for e2m1 codes in blocks of 32, packed two per byte (low nibble first).
    `pairs[byte]` holds the float32 bits of both nibbles' values (normal floats, unlike the
    shifted codes above), low nibble in the low word: one 256-entry lookup per byte unpacks
    two codes with no interleaved stores, and one exact product scales them."""
    nq = qcols.shape[0]
    m = _rows_per_layer(out, q_e8, bf, fl, tail, nq, bcols.shape[0], fcols.shape[0])
    bits = out.view(np.uint32)
    scratch = np.empty(16, np.uint64)
    as_float = scratch.view(np.float32)
    for l in range(out.shape[0]):
        for i in range(m):
            r = l * m + i
            row = out[l, r0 + i]
            for j in range(nq):
                scale = pow2[q_e8[r, j]]
                dst = row[qcols[j] * 32 : qcols[j] * 32 + 32]
                cj = q_codes[r, j]
                for k in range(16):
                    scratch[k] = pairs[cj[k]]
                for k in range(32):
                    dst[k] = as_float[k] * scale
            _copy_other_modes(row, bits[l, r0 + i], r, bf, bcols, fl, fcols, tail, 32)


@numba.njit(cache=True, nogil=True, error_model="numpy")
def decode_e2m1_all_q(q_codes, q_e8, pairs, pow2, out, r0):
    """decode_e2m1 for the usual index-key layout, every column block q: a layer's rows are
    then one run of blocks in both the codes and the target, decoded as one flat loop (about
    1.4x the per-row loop, whose per-row set-up dominates 128-channel rows)."""
    nl = out.shape[0]
    d = out.shape[2]
    nq = d // 32
    m = q_e8.shape[0] // nl
    codes = q_codes.reshape(-1)
    e8 = q_e8.reshape(-1)
    scratch = np.empty(16, np.uint64)
    as_float = scratch.view(np.float32)
    for l in range(nl):
        flat = out[l].reshape(-1)
        o0 = r0 * d
        b0 = l * m * nq
        for b in range(m * nq):
            scale = pow2[e8[b0 + b]]
            src = codes[(b0 + b) * 16 : (b0 + b) * 16 + 16]
            for k in range(16):
                scratch[k] = pairs[src[k]]
            dst = flat[o0 + b * 32 : o0 + b * 32 + 32]
            for k in range(32):
                dst[k] = as_float[k] * scale


@numba.njit(cache=True, nogil=True, error_model="numpy")
def decode_any(
    q_codes, q_e8, qcols, bf, bcols, fl, fcols, tail, w, nbits, mbits, bias, pow2, out, r0
):
    """As decode_e4m3 for any sign-magnitude mini float of nbits (8, or 4 packed two per
    byte) with mbits mantissa bits and this bias, in blocks of w (f32: no q blocks)."""
    nq = qcols.shape[0]
    m = _rows_per_layer(out, q_e8, bf, fl, tail, nq, bcols.shape[0], fcols.shape[0])
    bits = out.view(np.uint32)
    scratch = np.empty(max(w, 1), np.uint32)
    as_float = scratch.view(np.float32)
    mag_mask = np.uint32((1 << (nbits - 1)) - 1)
    sign_bit = np.uint32(1 << (nbits - 1))
    unbias = np.float32(2.0 ** (127 - bias))
    for l in range(out.shape[0]):
        for i in range(m):
            r = l * m + i
            row = out[l, r0 + i]
            for j in range(nq):
                scale = pow2[q_e8[r, j]]
                dst = row[qcols[j] * w : qcols[j] * w + w]
                cj = q_codes[r, j]
                for k in range(w):
                    c = np.uint32(cj[k // 2] >> (4 * (k % 2)) if nbits == 4 else cj[k])
                    c &= np.uint32((1 << nbits) - 1)
                    scratch[k] = ((c & mag_mask) << (23 - mbits)) | ((c & sign_bit) << (32 - nbits))
                for k in range(w):
                    dst[k] = as_float[k] * unbias * scale
            _copy_other_modes(row, bits[l, r0 + i], r, bf, bcols, fl, fcols, tail, w)


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


@numba.njit(cache=True, nogil=True, error_model="numpy")
def fill_rows(fill, table, out):
    """See codec.fill_rows: one pass that checks the codes, counts code 0 and fills rows."""
    n0 = 0
    nt = table.shape[0]
    for i in range(fill.shape[0]):
        code = np.int64(fill[i])
        if code >= nt:
            return -1
        if code == 0:
            n0 += 1
        v = table[code]
        row = out[i]
        for k in range(row.shape[0]):
            row[k] = v
    return n0
