"""The randomised Hadamard rotation of an update, and its inverse.

Pad to ``D`` (a multiple of the block size ``B``, a power of two, see
:func:`protocol.codec.params.rotation_block`), flip signs with the round's Rademacher vector
``s`` (:func:`protocol.codec.randomness.rotation_signs`) and apply the orthonormal
Walsh-Hadamard transform of size ``B`` to each of the ``D / B`` interleaved blocks (block ``j``
holds coordinates ``j, j + D/B, j + 2D/B, ...``), in O(D log B). It spreads the energy so that
every coordinate is about ``||x|| / sqrt(D)``, which lets a narrow common range quantize every
coordinate (:mod:`protocol.codec.quantize`). Interleaving spreads every parameter tensor over
all blocks, so their energies stay even.

This is the structured random rotation ``H D`` (Walsh-Hadamard times a random sign diagonal) of
Suresh, Yu, Kumar & McMahan 2017 ("Distributed Mean Estimation with Limited Communication",
ICML), which takes the mean squared error of stochastic k-level quantization of ``n``
d-dimensional vectors from ``O(d / n)`` down to ``O(log d / n)`` (relative to their mean
squared norm), and of Konecny et al. 2016 ("Federated Learning: Strategies for Improving
Communication Efficiency", arXiv:1610.05492), who rotate before subsampling and quantizing a
federated update for the same reason. Here the signs are shared by the round (every device and
the server derive them from the round seed), the transform is applied blockwise and the server
un-rotates the sum once (:func:`unrotate`).
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Any

import numpy as np
import numpy.typing as npt

from protocol.codec.params import CodecError, CodecParams, FloatVec, padded_dim, rotation_block
from protocol.codec.randomness import rotation_signs

__all__ = ["FWHT_CHUNK_BYTES", "fwht", "rotate", "rotate_scaled", "unrotate", "wht"]


@lru_cache(maxsize=16)
def _hadamard(log2n: int, dtype: str) -> npt.NDArray[Any]:
    h = np.ones((1, 1), dtype=dtype)
    for _ in range(log2n):
        h = np.block([[h, h], [h, -h]])
    h.setflags(write=False)  # cached: shared by every caller
    return h


FWHT_CHUNK_BYTES = 1 << 18  # the levels that fit in such a contiguous chunk run in cache
_FWHT_WIDE_STRIDE = 256  # from this stride on, 4x4 blocks beat 16x16 ones (fewer flops)


def _pass_plan(levels: int, stride: int, wide: int) -> list[int]:
    """Levels per pass (``log2 f``) for ``levels`` butterfly levels starting at ``stride``:
    16x16 Hadamard blocks while the stride is short (a batched GEMM of short rows is
    overhead-bound: four levels per pass amortise it), 4x4 blocks from stride ``wide`` on
    (long rows: the pass is bandwidth-bound and H_4 does 4 instead of 16 multiply-adds per
    element). Measured per level and 64K-element chunk here: 8 us for 16x16 at stride 1,
    5 us for 4x4 at stride >= 256 (13 us for 16x16 at stride 4096)."""
    out = []
    while levels > 0:
        c = min(levels, 4 if stride < wide else 2)
        out.append(c)
        levels -= c
        stride <<= c
    return out


def _hadamard_pass(h: npt.NDArray[Any], src: npt.NDArray[Any], dst: npt.NDArray[Any], stride: int) -> None:
    """``dst = H_f`` applied along the axis of stride ``stride`` (``f = len(h)``)."""
    f = h.shape[0]
    if stride == 1:
        np.matmul(src.reshape(-1, f), h, out=dst.reshape(-1, f))  # H is symmetric
    else:
        np.matmul(h, src.reshape(-1, f, stride), out=dst.reshape(-1, f, stride))


def wht(
    src: npt.NDArray[Any],
    total: int,
    blocks: int,
    dtype: type[np.floating[Any]],
    *,
    scale: float = 1.0,
    signs: npt.NDArray[Any] | None = None,
    out: npt.NDArray[Any] | None = None,
) -> npt.NDArray[Any]:
    """``scale * H_B`` applied to each of the ``blocks`` interleaved blocks of
    ``pad(src) * signs`` (zero-padded to ``total = blocks * B``, ``B`` a power of two): a
    new ``dtype`` array, or ``out`` (``total`` contiguous ``dtype`` elements, not ``src``);
    ``src`` is only read.

    ``H_B`` is the Kronecker product of small Hadamard blocks ``H_f`` (``f`` = 16 or 4, see
    :func:`_pass_plan`), so the transform is one batched matrix product per block of index
    bits: viewing the vector as ``(D / (f * s), f, s)`` for stride ``s`` (1, 16, 256, 1024,
    ...), multiply every ``(f, s)`` slice by ``H_f``. No transposes, BLAS does the flops.
    Starting at stride ``blocks`` instead of 1 transforms the slot index ``i // blocks`` and
    leaves the block index ``i % blocks`` alone: that is the interleaved block transform.
    The levels whose groups fit in a contiguous chunk of ``FWHT_CHUNK_BYTES`` run chunk
    by chunk in two small buffers (in L2, with the sign flip applied while loading); only
    the remaining top levels pass over the whole vector, in place, a slab of columns at a
    time. The scale is folded into the first Hadamard block.
    """
    levels = (total // blocks).bit_length() - 1
    local = levels
    while local > 0 and (blocks << local) * np.dtype(dtype).itemsize > FWHT_CHUNK_BYTES:
        local -= 1
    chunk = blocks << local
    in_chunk = _pass_plan(local, blocks, _FWHT_WIDE_STRIDE)
    passes = in_chunk + _pass_plan(levels - local, chunk, 0)
    hs = [_hadamard(c, np.dtype(dtype).name) for c in passes]
    if hs:
        hs[0] = hs[0] * dtype(scale)
    n = src.shape[0]
    if out is None:
        out = np.empty(total, dtype=dtype)
    elif out.shape != (total,) or out.dtype != dtype or not out.flags.c_contiguous:
        raise CodecError(f"transform output must be {total} contiguous {np.dtype(dtype)}")
    buf = (np.empty(chunk, dtype=dtype), np.empty(chunk, dtype=dtype))
    n_local = len(in_chunk)
    for s in range(0, total, chunk):
        e = s + chunk
        k = max(0, min(n, e) - s)
        cur = buf[0] if n_local else out[s:e]
        if signs is None:
            np.copyto(cur[:k], src[s : s + k])
        else:
            np.multiply(src[s : s + k], signs[s : s + k], out=cur[:k])
        cur[k:] = 0.0
        if not hs:
            cur *= dtype(scale)
        stride = blocks
        for i in range(n_local):
            dst = out[s:e] if i == n_local - 1 else buf[1] if cur is buf[0] else buf[0]
            _hadamard_pass(hs[i], cur, dst, stride)
            cur = dst
            stride *= hs[i].shape[0]
    for h in hs[n_local:]:
        # in place, a slab of columns at a time through the small buffer
        f = h.shape[0]
        view = out.reshape(-1, f, stride)
        width = max(1, chunk // (view.shape[0] * f))
        slab = buf[0] if view.shape[0] * f * width <= chunk else np.empty(view.shape[0] * f * width, dtype)
        for j in range(0, stride, width):
            cols = view[:, :, j : j + width]
            tmp = slab[: cols.size].reshape(cols.shape)
            np.matmul(h, cols, out=tmp)
            cols[...] = tmp
        stride *= f
    return out


def fwht(x: npt.NDArray[Any]) -> npt.NDArray[Any]:
    """Orthonormal Walsh-Hadamard transform ``H x / sqrt(D)`` (its own inverse), O(D log D).

    Returns a new array (float32 stays float32, anything else becomes float64).
    """
    x = np.asarray(x)
    big_d = x.shape[0]
    if x.ndim != 1 or big_d & (big_d - 1) or big_d == 0:
        raise CodecError(f"fwht needs a 1-D power-of-two length, got shape {x.shape}")
    dtype = x.dtype if x.dtype in (np.float32, np.float64) else np.dtype(np.float64)
    return wht(x, big_d, 1, dtype.type, scale=1.0 / math.sqrt(big_d))


def rotate_scaled(
    x: FloatVec,
    params: CodecParams,
    scale: float,
    dtype: type[np.floating[Any]] = np.float32,
    out: npt.NDArray[Any] | None = None,
) -> npt.NDArray[Any]:
    """``scale * rotate(x)``: the sign flip while loading chunks, the scale in the first
    Hadamard block (no pass of its own, no padded copy of ``x``); into ``out`` if given."""
    d = x.shape[0]
    block = rotation_block(params, d)
    big_d = padded_dim(params, d)
    signs = rotation_signs(params, d)
    return wht(x, big_d, big_d // block, dtype, scale=scale / math.sqrt(block), signs=signs, out=out)


def rotate(x: FloatVec, params: CodecParams) -> FloatVec:
    """Randomised Hadamard rotation of a length-d vector: ``H (s * pad(x))``, where ``H`` is
    the orthonormal Walsh-Hadamard transform of each interleaved block (see the module doc)."""
    return rotate_scaled(np.asarray(x, dtype=np.float32), params, 1.0)


def unrotate(y: npt.NDArray[Any], params: CodecParams, d: int) -> npt.NDArray[Any]:
    """Inverse of :func:`rotate`: ``(s * H y)[:d]`` (keeps ``y``'s float dtype)."""
    y = np.asarray(y)
    block = rotation_block(params, d)
    big_d = padded_dim(params, d)
    if y.ndim != 1 or y.shape[0] != big_d:
        raise CodecError(f"rotated vector has shape {y.shape}, expected ({big_d},)")
    dtype = y.dtype if y.dtype in (np.float32, np.float64) else np.dtype(np.float64)
    z = wht(y, big_d, big_d // block, dtype.type, scale=1.0 / math.sqrt(block))[:d]
    z *= rotation_signs(params, d)[:d]
    return z
