"""y = x @ dequantize(Wq).T and dx = dy @ dequantize(Wq) for a few rows (token-by-token decoding,
M <= `GEMV_MAX_ROWS`), on the CUDA cores instead of the tensor cores.

Why a second kernel: with one row, `nf4_matmul`'s MMA tiles are 15/16 padding, and Nsight Compute
showed where its time goes on the H100 (benchmarks/nf4_NOTES.md, session 3): 14 instructions per
weight value, the packed tile read back from shared memory one byte at a time, 16% occupancy. Here
nothing goes through shared memory or an MMA layout: each thread loads packed bytes straight into
registers, decodes them with the same byte-permute PTX (`nf4_matmul.PRMT_PAIR_DECODE_ASM`) and
multiplies-adds them with x in fp32.

The weight is viewed `[out, in/64, 32]` (one row of the middle axis = one 64-block: its 32 packed
bytes), x `[M, in/64, 64]`. A byte's high nibble is an even input column, its low nibble the odd
one next to it, so the kernels read x (or write dx) at stride 2 and never interleave the nibbles.

Numerics: products accumulate in fp32, like `nf4_matmul`, but the decoded weight is not rounded to
x's dtype first: the forward scales each 64-block's partial sum by its absmax, the backward scales
dy by it. That is the exact dequantized weight (more accurate than the reference, which rounds the
weight to bf16); the two agree within bf16 rounding.

- Forward: programs own `block_rows` output features and loop over the input in steps of
  `blocks` 64-blocks; per step one in-thread sum over each block, scaled by its absmax.
- dx: programs own `blocks` 64-blocks of the input features and loop over output features in steps
  of `block_rows`, accumulating [block_rows, blocks, 32] products in registers (no cross-thread
  reduction inside the loop).
- Either may split its loop over several programs (`split`, automatic: until every SM has ~2),
  whose fp32 partials are summed after (by XLA, or in the kernel: `sum_in_kernel`).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from unsloth_jax import compat
from unsloth_jax.quant import NF4Tensor

from pallas_kernels import nf4_matmul as mm

# Most rows the CUDA-core kernels take: each row costs one FMA per weight value on top of the
# decode. At M = 2 the MMA kernels were already as fast (benchmarks/nf4_NOTES.md, session 4).
GEMV_MAX_ROWS = 1


@dataclasses.dataclass(frozen=True)
class GemvConfig:
    """One launch of the few-rows kernels (powers of two).

    block_rows: weight rows (output features) per loop step.
    blocks: 64-blocks of the input features per loop step (forward) or per program (dx).
    split: programs sharing one output tile's reduction (0 = automatic: ~2 programs per SM).
    decode: "prmt16" (inline PTX, NF4 values rounded to bf16: half the table work), "prmt" (exact
      fp32 values), or their any-backend twins "select16" / "select" (the interpreter's fallback).
    sum_in_kernel: a split's partials summed by the last program of each tile (see
      `nf4_matmul.TileConfig`), not by XLA after.
    """
    block_rows: int = 32
    blocks: int = 4
    num_warps: int = 4
    num_stages: int = 3
    split: int = 0
    decode: str = "prmt16"
    sum_in_kernel: bool = False


def default_gemv_config(n_out: int, n_red: int, *, dx: bool = False, dtype=jnp.bfloat16) -> GemvConfig:
    """Tiles from the H100 sweeps (benchmarks/nf4_NOTES.md, session 4): the forward wants
    64 weight rows x 2 blocks over 8 warps (16 packed bytes a thread: few registers, more warps),
    dx 16 rows x 8 blocks over 4 warps. 16-bit inputs decode to bf16-rounded NF4 values (prmt16,
    1.3x faster than exact), fp32 inputs to the exact ones."""
    decode = mm.few_rows_decode(dtype)
    if dx:
        return GemvConfig(block_rows=16, blocks=8, num_warps=4, num_stages=3, decode=decode)
    return GemvConfig(block_rows=64, blocks=2, num_warps=8, num_stages=3, decode=decode)


def supports(q: NF4Tensor) -> bool:
    """The few-rows kernels need whole 64-blocks per weight row (in % blocksize == 0)."""
    return q.shape[1] % q.blocksize == 0


def _rows(start, size, total):
    """Indices start..start+size, clamped to the last row (duplicate work, identical writes)."""
    return jnp.minimum(start + jnp.arange(size, dtype=jnp.int32), total - 1)


def _decoded_tile(w_ref, rows, b0, nb, decode):
    """The high- and low-nibble NF4 values (fp32, not yet scaled) of 64-blocks b0..b0+nb of `rows`:
    two [R, nb, 32] arrays = the even and the odd input columns of those blocks."""
    return mm._decode_packed(w_ref[rows, pl.ds(b0, nb), :], decode)


def _even_odd(ref, row, b0, nb, width):
    """ref[row, b0:b0+nb, even columns] and [.., odd columns]: a [1, nb, width/2] pair."""
    return tuple(ref[pl.ds(row, 1), pl.ds(b0, nb), cols] for cols in mm._even_odd_cols(0, width))


def _my_steps(total, split):
    """This program's slice of the reduction loop: (first step, number of steps). The launcher
    makes `split` divide `total`."""
    per = total // split
    return pl.program_id(1) * per, per


def _fwd_kernel(x_ref, w_ref, *scale_refs, store, m, n, nblk, bs, cfg, double_quant, split):
    br, nb = cfg.block_rows, cfg.blocks
    rows = _rows(pl.program_id(0) * br, br, n)
    first, steps = _my_steps(nblk // nb, split)

    def body(step, accs):
        b0 = pl.multiple_of((first + step) * nb, nb)
        hi, lo = _decoded_tile(w_ref, rows, b0, nb, cfg.decode)
        absmax = mm._tile_absmax(scale_refs, rows, b0, nb, nblk, double_quant)  # [R, nb]
        out = []
        for r in range(m):
            xe, xo = (t.astype(jnp.float32) for t in _even_odd(x_ref, r, b0, nb, bs))
            out.append(accs[r] + jnp.sum(hi * xe + lo * xo, axis=2) * absmax)
        return tuple(out)

    accs = jax.lax.fori_loop(0, steps, body, tuple(jnp.zeros((br, nb), jnp.float32) for _ in range(m)))
    store([((r, rows), jnp.sum(accs[r], axis=1)) for r in range(m)])


def _dx_kernel(dy_ref, w_ref, *scale_refs, store, m, n, nblk, bs, cfg, double_quant, split):
    br, nb = cfg.block_rows, cfg.blocks
    b0 = pl.multiple_of(pl.program_id(0) * nb, nb)
    first, steps = _my_steps(pl.cdiv(n, br), split)

    def body(step, accs):
        n0 = (first + step) * br
        rows = _rows(n0, br, n)
        hi, lo = _decoded_tile(w_ref, rows, b0, nb, cfg.decode)
        absmax = mm._tile_absmax(scale_refs, rows, b0, nb, nblk, double_quant)
        live = (n0 + jnp.arange(br, dtype=jnp.int32) < n)[:, None]  # clamped rows add nothing
        out = []
        for r in range(m):
            coef = (jnp.where(live, absmax * dy_ref[r, rows].astype(jnp.float32)[:, None], 0))[:, :, None]
            even, odd = accs[r]
            out.append((even + hi * coef, odd + lo * coef))
        return tuple(out)

    zero = jnp.zeros((br, nb, bs // 2), jnp.float32)
    accs = jax.lax.fori_loop(0, steps, body, tuple((zero, zero) for _ in range(m)))
    store([((pl.ds(r, 1), pl.ds(b0, nb), cols), jnp.sum(acc, axis=0, keepdims=True))
           for r in range(m) for acc, cols in zip(accs[r], mm._even_odd_cols(0, bs))])


def _fit(cfg: GemvConfig, nblk: int, interpret: bool) -> GemvConfig:
    """Shrink `blocks` to divide the number of 64-blocks; the interpreter decodes by select."""
    nb = cfg.blocks
    while nblk % nb:
        nb //= 2
    return mm._runnable_decode(dataclasses.replace(cfg, blocks=nb), interpret)


def _split(cfg: GemvConfig, tiles: int, steps: int) -> int:
    """Programs per output tile: cfg.split, or (0) nf4_matmul's rule (powers of two until ~2
    programs per SM); reduced to a divisor of the loop's steps."""
    split = min(cfg.split, steps) if cfg.split else mm._auto_split(tiles, steps)
    while steps % split:
        split -= 1
    return split


def _launch(kernel, a, q, out_dims, tiles, steps, cfg, interpret, name):
    """a [m, .] against the packed weight viewed [out, in/64, 32]; the kernel writes
    [m, *out_dims], returned as [m, prod(out_dims)] in a's dtype."""
    m = a.shape[0]
    n, k, bs = q.shape[0], q.shape[1], q.blocksize
    split = _split(cfg, tiles, steps)
    body = functools.partial(kernel, m=m, n=n, nblk=k // bs, bs=bs, cfg=cfg,
                             double_quant=q.double_quant, split=split)
    out = mm.split_pallas_call(
        body, [a, q.packed.reshape(n, k // bs, bs // 2), *mm._scale_operands(q, True, k)],
        jax.ShapeDtypeStruct((m, *out_dims), a.dtype), grid=(tiles, split), split=split,
        sum_in_kernel=cfg.sum_in_kernel, interpret=interpret, name=name,
        compiler_params=None if interpret else compat.triton_compiler_params(
            num_warps=cfg.num_warps, num_stages=cfg.num_stages))
    return out.reshape(m, -1)


def gemv_forward(x2, q: NF4Tensor, *, interpret=False, cfg: GemvConfig | None = None):
    """x2 [m, in] (m <= GEMV_MAX_ROWS) @ dequantize(q).T -> [m, out] in x2's dtype."""
    m, k = x2.shape
    n, bs = q.shape[0], q.blocksize
    cfg = _fit(cfg or default_gemv_config(n, k, dtype=x2.dtype), k // bs, interpret)
    return _launch(_fwd_kernel, x2.reshape(m, k // bs, bs), q, (n,), pl.cdiv(n, cfg.block_rows),
                   k // bs // cfg.blocks, cfg, interpret, "nf4_gemv_fwd")


def gemv_dx(dy2, q: NF4Tensor, *, interpret=False, cfg: GemvConfig | None = None):
    """dy2 [m, out] (m <= GEMV_MAX_ROWS) @ dequantize(q) -> [m, in] in dy2's dtype."""
    m = dy2.shape[0]
    n, k, bs = q.shape[0], q.shape[1], q.blocksize
    cfg = _fit(cfg or default_gemv_config(k, n, dx=True, dtype=dy2.dtype), k // bs, interpret)
    return _launch(_dx_kernel, dy2, q, (k // bs, bs), k // bs // cfg.blocks, pl.cdiv(n, cfg.block_rows),
                   cfg, interpret, "nf4_gemv_dx")
