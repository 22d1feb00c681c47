"""y = x @ dequantize(Wq).T with the NF4 dequantization fused into the matmul tiles.

`Wq` is an `unsloth_jax.quant.NF4Tensor` (HF `[out, in]` layout, bitsandbytes storage: packed
uint8 codes, 8-bit absmax codes, per-256 scales, offset). Each program loads the packed bytes of
its weight tile, splits the nibbles, looks the 16 NF4 values up, decodes the absmax of each
64-block (nested_code[q] * nested_scale + offset) and scales, all in registers: the weight is never
written out in 16 bits. The backward pass (`dx = dy @ dequantize(Wq)`) decodes the same tiles the
same way; the frozen weight gets a zero cotangent.

- `nf4_matmul(x, q, *, interpret=False)`: the `jax.custom_vjp`, Pallas (Triton lowering) both ways;
  up to 4 rows it runs the CUDA-core kernels of `pallas_kernels/nf4_gemv.py` instead of MMAs.
- `nf4_matmul_reference(x, q)`: plain jnp (dequantize, then einsum); the definition to match.
- `nf4_dequantize(q)` / `dequant_matmul(x, q)`: for many rows, one Pallas pass writes the 16-bit
  weight (same values as `dequantize_nf4`), cuBLAS multiplies; the backward dequantizes again.
- `nf4_linear(x, q)`: dispatch on `UNSLOTH_JAX_KERNELS` (pallas | interpret | reference) and on the
  number of rows (`KERNEL_MAX_ROWS`).

x is `[..., in]`, the result `[..., out]` in x's dtype; products accumulate in fp32 and the
decoded weight is rounded to x's dtype first (as `dequantize_nf4(q, x.dtype)` is).

Tiling. Forward: programs tile (M, N) and loop over K; backward: they tile (M, K) and loop over N.
For few rows (decode, M <= 16) a program also takes a slice of the reduction (split-K) so that
every SM streams weight bytes; the fp32 partials are summed outside (or, opt-in, by each output
tile's last program: `TileConfig.sum_in_kernel`, measured slower on the H200). Row/column indices past
the edges are clamped (duplicated work whose writes are identical), the reduction edge is
zero-masked, so nothing is padded in HBM. The fast path needs `in % 64 == 0` (a block never
straddles two rows); other shapes decode each element from its flat index (slower, exact).
"""
from __future__ import annotations

import math

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from jax.experimental import pallas as pl

from unsloth_jax import compat
from unsloth_jax.quant import NESTED_BLOCKSIZE, NF4_CODE, NF4Tensor, no_fma, dequantize_nf4


@dataclasses.dataclass(frozen=True)
class TileConfig:
    """Tile sizes (powers of two, for Triton) and launch parameters of one kernel launch.

    block_m/block_n/block_k: tile of the output rows / output columns / reduction.
    split_k: programs sharing one output tile's reduction (fp32 partials, summed after);
      0 = automatic: split only while there are fewer than two output tiles per SM.
    group_m: output-row tiles visited together, so neighbouring programs share weight tiles in L2.
    decode: how a 4-bit code becomes its NF4 value: "prmt" (byte permutes in inline PTX, eight
      codes per ~47 instructions, see `PRMT_PAIR_DECODE_ASM`; GPU only, the interpreter falls back
      to "select") or "select" (a 4-level select tree, ~50 instructions per code; any backend).
      ("prmt16"/"select16" decode to the bf16-rounded values, then scale in fp32 and round again:
      within a bf16 ulp of the reference's single rounding, not bit-equal to it; half the table
      work. The default for 16-bit inputs at M <= 16 and in `nf4_gemv`.)
    weight_lhs: make the decoded weight tile the left MMA operand and accumulate the transposed
      product (a Hopper left operand may come from registers); measured within 10% either way.
    interleave: put the high- and low-nibble values back in K order before one product (a
      register shuffle). False keeps them apart: two half-width products against the even and
      the odd K columns of x (stride-2 loads), or, for dx, two accumulators stored to the even and
      odd output columns. Only the fast path (in % 64 == 0) has the choice.
    sum_in_kernel: with a split reduction, the last program of each output tile to finish adds
      the fp32 partials (in split order, so the result does not depend on who finished last) and
      writes the output: one launch instead of the kernel plus XLA's sum-and-cast pass.
    """
    block_m: int = 64
    block_n: int = 64
    block_k: int = 64
    num_warps: int = 4
    num_stages: int = 3
    split_k: int = 0
    group_m: int = 8
    decode: str = "prmt"
    weight_lhs: bool = True
    interleave: bool = True
    sum_in_kernel: bool = False


# ---- reference ---------------------------------------------------------------------------------

def nf4_matmul_reference(x, q: NF4Tensor):
    """x @ dequantize_nf4(q, x.dtype).T with fp32 accumulation; no gradient reaches q."""
    w = jax.lax.stop_gradient(dequantize_nf4(q, x.dtype))
    y = jnp.einsum("...k,nk->...n", x, w, preferred_element_type=jnp.float32)
    return y.astype(x.dtype)


# ---- decoding inside a tile --------------------------------------------------------------------

# The NF4 values rounded to bf16 ("prmt16"/"select16" decodes): for kernels that do not promise
# the reference's rounding (the few-rows kernels: `nf4_gemv`, the MMA kernel at M <= 16 for 16-bit
# inputs); half the table planes.
NF4_CODE_BF16 = NF4_CODE.astype(ml_dtypes.bfloat16).astype(np.float32)


def few_rows_decode(dtype) -> str:
    """The decode of the few-rows kernels: bf16-rounded codes for 16-bit inputs (half the table
    work), the exact values for fp32 ones."""
    return "prmt" if jnp.dtype(dtype) == jnp.float32 else "prmt16"


def _lookup_nf4(codes, table=NF4_CODE):
    """int32 codes (0..15) -> their fp32 values in `table`, by a select tree (any backend)."""
    bits = [(codes & (1 << b)) != 0 for b in range(4)]
    level = [jnp.float32(v) for v in table]
    for bit in bits:  # pair up neighbours on the lowest remaining bit: 16 -> 8 -> 4 -> 2 -> 1
        level = [jnp.where(bit, level[2 * i + 1], level[2 * i]) for i in range(len(level) // 2)]
    return level[0]


def _prmt_pair_decode_asm(bf16_codes: bool = False) -> str:
    """PTX that turns 4 packed bytes ($8) into the fp32 NF4 values of their high nibbles
    ($0-$3, byte i -> $i) and of their low nibbles ($4-$7): exact, or (`bf16_codes`) the values
    rounded to bf16, which need only two byte planes of table.

    `prmt d, a, b, sel` picks each byte of d from the 8 bytes of (a, b) by a 3-bit index (a
    selector nibble). The 16 fp32 values are held as 4 byte planes x 16 entries = 4 x 4 registers.
    The low 16 bits of the word already are 4 codes in selector order (lo0, hi0, lo1, hi1), the
    high 16 bits the next 4: `& 0x7777` indexes entries 0-7 (one prmt) and 8-15 (another), a third
    prmt picks per byte by the code's bit 3. That gives one byte plane of 4 values; eight more
    prmts transpose 4 planes x 4 values into 4 fp32 registers. About 47 instructions for 8 values
    (the select tree: ~50 per value). On the H100 this block ran 5-10% faster than one block per
    nibble, which had to compact the nibbles first (benchmarks/nf4_NOTES.md, session 3). With bf16
    codes the two planes are the upper half of each fp32: a prmt pairs two values' planes, a shift
    and a mask place them (~30 instructions for 8 values)."""
    table = NF4_CODE_BF16 if bf16_codes else NF4_CODE
    bits = table.astype("<f4").view(np.uint8).reshape(16, 4)  # [code, byte plane]
    planes = (2, 3) if bf16_codes else (0, 1, 2, 3)  # bf16 values: planes 0, 1 are zero
    lines = ["{", ".reg .b32 t<16>, s, m, w, p<4>, x, y;"]
    for i, plane in enumerate(planes):
        for quad in range(4):
            word = sum(int(bits[quad * 4 + j, plane]) << (8 * j) for j in range(4))
            lines.append(f"mov.b32 t{i * 4 + quad}, {word:#010x};")
    # value order within a half word: (lo of byte 2h, hi of byte 2h, lo of byte 2h+1, hi of byte 2h+1)
    for half, outs in ((0, ("$4", "$0", "$5", "$1")), (1, ("$6", "$2", "$7", "$3"))):
        lines += [f"shr.b32 w, $8, {16 * half};", "and.b32 s, w, 0x7777;",
                  "shr.b32 m, w, 1;", "and.b32 m, m, 0x4444;", "or.b32 m, m, 0x3210;"]
        for i in range(len(planes)):
            t = i * 4
            lines += [f"prmt.b32 x, t{t}, t{t + 1}, s;", f"prmt.b32 y, t{t + 2}, t{t + 3}, s;",
                      f"prmt.b32 p{i}, x, y, m;"]
        for pair_sel, (o1, o2) in (("0x5140", outs[:2]), ("0x7362", outs[2:])):
            if bf16_codes:  # x = two bf16 values (planes 2, 3 of each): low half, high half
                lines += [f"prmt.b32 x, p0, p1, {pair_sel};", f"shl.b32 {o1}, x, 16;",
                          f"and.b32 {o2}, x, 0xffff0000;"]
            else:
                lines += [f"prmt.b32 x, p0, p1, {pair_sel};", f"prmt.b32 y, p2, p3, {pair_sel};",
                          f"prmt.b32 {o1}, x, y, 0x5410;", f"prmt.b32 {o2}, x, y, 0x7632;"]
    lines.append("}")
    return "\n".join(lines)


PRMT_PAIR_DECODE_ASM = _prmt_pair_decode_asm()
PRMT_PAIR_DECODE_BF16_ASM = _prmt_pair_decode_asm(bf16_codes=True)


@functools.cache
def _inline_asm_primitive():
    """Pallas' `elementwise_inline_asm` lowers only single-result assembly (it wraps the op's
    results in one more list), so the paired decode binds this primitive instead: the same
    Triton op, every result returned. Triton orders the outputs result-major: result r's
    `pack` registers, then result r+1's; the inputs follow. It uses JAX internals (`jax._src`),
    checked on 0.10.2 and 0.11.2; tests/test_nf4_matmul.py lowers it for CUDA on the CPU."""
    from jax._src import core as jax_core
    from jax._src.lib.triton import dialect as tt_dialect
    from jax._src.pallas.triton import lowering as triton_lowering
    from jax.interpreters import mlir

    prim = jax_core.Primitive("unsloth_jax_inline_asm")
    prim.multiple_results = True
    prim.def_abstract_eval(lambda *avals, result_shape_dtypes, **_: [
        jax_core.ShapedArray(r.shape, r.dtype) for r in result_shape_dtypes])

    def lower(ctx, *args, asm, constraints, pack, result_shape_dtypes):
        types = [mlir.aval_to_ir_type(ctx.context.mlir_ctx, aval) for aval in ctx.avals_out]
        res = tt_dialect.elementwise_inline_asm(types, asm, constraints=constraints, pure=True,
                                                packed_element=pack, args=list(args))
        return list(res) if len(types) > 1 else [res]

    triton_lowering.register_lowering(prim)(lower)
    return prim


def _decode_packed(packed_u8, decode):
    """uint8 packed codes (any shape) -> fp32 NF4 values of the high and of the low nibbles."""
    f32 = jax.ShapeDtypeStruct(packed_u8.shape, jnp.float32)
    if decode in ("prmt", "prmt16"):
        hi, lo = _inline_asm_primitive().bind(
            packed_u8, asm=PRMT_PAIR_DECODE_ASM if decode == "prmt" else PRMT_PAIR_DECODE_BF16_ASM,
            constraints=",".join(["=r"] * 8 + ["r"]), pack=4, result_shape_dtypes=(f32, f32))
    else:
        packed = packed_u8.astype(jnp.int32)
        table = NF4_CODE_BF16 if decode == "select16" else NF4_CODE
        hi, lo = _lookup_nf4(packed >> 4, table), _lookup_nf4(packed & 15, table)
    return hi, lo


def _block_absmax(scale_refs, blk, double_quant):
    """fp32 absmax of the 64-blocks with flat indices `blk` (an int32 array)."""
    if not double_quant:
        (absmax_ref,) = scale_refs
        return absmax_ref[blk]
    qabs_ref, nested_ref, code_ref, offset_ref = scale_refs
    codes = qabs_ref[blk].astype(jnp.int32)
    return no_fma(code_ref[codes] * nested_ref[blk // NESTED_BLOCKSIZE]) + offset_ref[0]  # as bnb


def _tile_absmax(scale_refs, rows, b0, nb, blocks_per_row, double_quant):
    """fp32 absmax of 64-blocks b0..b0+nb of weight rows `rows` (int32 [R]): [R, nb]. Fast-path
    layout: the absmax (codes) viewed [N, K/bs]."""
    if not double_quant:
        return scale_refs[0][rows, pl.ds(b0, nb)]
    qabs_ref, nested_ref, code_ref, offset_ref = scale_refs
    qabs = qabs_ref[rows, pl.ds(b0, nb)].astype(jnp.int32)
    blk = rows[:, None] * blocks_per_row + (b0 + jnp.arange(nb, dtype=jnp.int32))[None, :]
    return no_fma(code_ref[qabs] * nested_ref[blk // NESTED_BLOCKSIZE]) + offset_ref[0]  # as bnb


def _weight_tile_halves(w_ref, scale_refs, rows, k0, bk, *, bs, k_total, double_quant, decode, dtype):
    """Decoded weight rows `rows` (int32 [R]), columns k0..k0+bk, as its even and its odd columns
    (the high and the low nibbles of the packed bytes): two [R, bk/2] arrays in `dtype`.

    Fast path (k_total % bs == 0): w_ref is the packed weight viewed [N, K/2], the absmax refs
    [N, K/bs]; bk is a multiple of bs so a tile holds whole blocks of each row."""
    packed = w_ref[rows, pl.ds(pl.multiple_of(k0 // 2, bk // 2), bk // 2)]  # uint8 [R, bk/2]
    hi, lo = _decode_packed(packed, decode)
    per_row = bk // bs
    absmax = _tile_absmax(scale_refs, rows, k0 // bs, per_row, k_total // bs, double_quant)
    r = rows.shape[0]

    def scaled(vals):  # [R, bk/2] packed columns: bs/2 of them per block
        if per_row == 1:
            return (vals * absmax).astype(dtype)
        return (vals.reshape(r, per_row, bs // 2) * absmax[:, :, None]).reshape(r, bk // 2).astype(dtype)

    return scaled(hi), scaled(lo)


def _weight_tile_rows(w_ref, scale_refs, rows, k0, bk, **kw):
    """The same tile in K order, [R, bk]: element 2j is byte j's high nibble, 2j+1 its low one.
    (Scaled and rounded before the interleave, so that the shuffle moves 16-bit values.)"""
    even, odd = _weight_tile_halves(w_ref, scale_refs, rows, k0, bk, **kw)
    return jnp.stack([even, odd], axis=-1).reshape(rows.shape[0], bk)


def _weight_tile_flat(w_ref, scale_refs, rows, k0, bk, *, bs, k_total, double_quant, decode, dtype):
    """General path (any K): each element decoded from its flat index n*K + k. Columns past K are
    clamped to K-1 (finite values; the caller zeroes their partner operand or drops them)."""
    cols = jnp.minimum(k0 + jnp.arange(bk, dtype=jnp.int32), k_total - 1)
    flat = rows[:, None] * k_total + cols[None, :]
    byte = w_ref[flat >> 1].astype(jnp.int32)
    codes = (byte >> ((1 - (flat & 1)) * 4)) & 15
    vals = _lookup_nf4(codes)  # one code per byte here: nothing for prmt to pack
    return (vals * _block_absmax(scale_refs, flat // bs, double_quant)).astype(dtype)


# ---- kernels -------------------------------------------------------------------------------------

def _grouped_pid(pid, num_a, num_b, group):
    """Program id -> (tile along a, tile along b), walking `group` a-tiles at a time so that
    consecutive programs reuse the same b-tiles (weight tiles) from L2."""
    width = group * num_b
    first = (pid // width) * group
    size = jnp.minimum(num_a - first, group)
    return first + (pid % width) % size, (pid % width) // size


def _dot(a, b_t, dtype):
    """a [m, k] @ b_t[n, k].T in fp32; fp32 inputs use full-precision products."""
    prec = jax.lax.Precision.HIGHEST if dtype == jnp.float32 else None
    return jax.lax.dot_general(a, b_t, (((1,), (1,)), ((), ())), precision=prec,
                               preferred_element_type=jnp.float32)


def _dot_tn(a, b, dtype):
    """a[k, m].T @ b[n, k].T = (b @ a).T: the transposed product with a as the left operand."""
    prec = jax.lax.Precision.HIGHEST if dtype == jnp.float32 else None
    return jax.lax.dot_general(a, b, (((0,), (1,)), ((), ())), precision=prec,
                               preferred_element_type=jnp.float32)


def _dot_nn(a, b, dtype):
    prec = jax.lax.Precision.HIGHEST if dtype == jnp.float32 else None
    return jax.lax.dot_general(a, b, (((1,), (0,)), ((), ())), precision=prec,
                               preferred_element_type=jnp.float32)


def _reduce(body, steps, split, init):
    """Run this program's share of the reduction: `steps // split` iterations with a static trip
    count (Triton pipelines only counted loops), starting at its slice of the steps."""
    per = steps // split  # the launcher makes split divide steps
    if split == 1:
        return jax.lax.fori_loop(0, per, body, init)
    start = pl.program_id(1) * per
    return jax.lax.fori_loop(0, per, lambda i, a: body(start + i, a), init)


def _zeros(*shape):
    return jnp.zeros(shape, jnp.float32)


def _partial_index(s, idx):
    """Index of split slice `s` of the partials buffer at output index idx, and whether the value
    needs a leading unit axis (idx all slices: an int among slices would move axes)."""
    if any(isinstance(i, jax.Array) for i in idx):
        return (s, *idx), False
    return (pl.ds(s, 1), *idx), True


def store_tiles(out_refs, stores, *, split, sum_in_kernel, interpret):
    """Write this program's results, `stores` = [(output index, fp32 value)]. Unsplit: straight to
    the output. Split: fp32 partials to the program's own slice of a [split, ...] buffer (out_refs
    from `split_pallas_call`); XLA sums them after, or with `sum_in_kernel` the last program of the
    output tile to count itself in (one atomic per program) sums them here."""
    if split == 1:
        (o_ref,) = out_refs
        for idx, val in stores:
            o_ref[idx] = val.astype(o_ref.dtype)
        return
    part_ref = out_refs[0]
    for idx, val in stores:
        pidx, unit = _partial_index(pl.program_id(1), idx)
        part_ref[pidx] = val[None] if unit else val
    if not sum_in_kernel:
        return
    from jax.experimental.pallas import triton as plgpu

    _, o_ref, count_ref = out_refs
    if not interpret:  # all of this program's partial stores happen before its count (CUTLASS's serial split-K)
        plgpu.debug_barrier()
    arrived = plgpu.atomic_add(count_ref, pl.program_id(0), jnp.int32(1))  # acquire-release, GPU scope

    @pl.when(arrived == split - 1)
    def _sum_partials():
        for idx, _ in stores:
            total = None
            for s in range(split):
                pidx, unit = _partial_index(s, idx)
                part = part_ref[pidx]
                part = part[0] if unit else part
                total = part if total is None else total + part
            o_ref[idx] = total.astype(o_ref.dtype)


def split_pallas_call(kernel, operands, out, *, grid, split, sum_in_kernel, interpret, **call_kw):
    """pallas_call of `kernel(*operand_refs, store=...)` on `grid` = (output tiles, split), where
    `store(stores)` is `store_tiles` bound to the output buffers; returns `out` (a
    ShapeDtypeStruct). Split reductions get an fp32 [split, *out.shape] buffer, and with
    `sum_in_kernel` also the output and a per-tile arrival count (zeros, aliased in and out)."""
    in_kernel = split > 1 and sum_in_kernel
    if split == 1:
        shapes = (out,)
    else:
        shapes = (jax.ShapeDtypeStruct((split, *out.shape), jnp.float32),)
        if in_kernel:
            shapes += (out, jax.ShapeDtypeStruct((grid[0],), jnp.int32))
    n_in = len(operands)
    plan = dict(split=split, sum_in_kernel=in_kernel, interpret=interpret)

    def body(*refs):
        out_refs = refs[n_in + in_kernel:]  # past the count's input alias
        kernel(*refs[:n_in], store=functools.partial(store_tiles, out_refs, **plan))

    counts = [jnp.zeros((grid[0],), jnp.int32)] if in_kernel else []
    res = pl.pallas_call(body, out_shape=shapes, grid=grid, interpret=interpret,
                         input_output_aliases={n_in: 2} if in_kernel else {}, **call_kw)(*operands, *counts)
    if split == 1:
        return res[0]
    if in_kernel:
        return res[1]
    return res[0].sum(axis=0).astype(out.dtype)


def _out_index(rows, cols):
    """o[rows, cols] for a row index array and a pl.ds or an index array of columns."""
    return (rows, cols) if not isinstance(cols, jax.Array) else (rows[:, None], cols[None, :])


def _tile_cols(c0, bc, c_total):
    """The output columns c0..c0+bc; past the edge they are clamped (identical duplicate writes)."""
    if c_total % bc == 0:
        return pl.ds(pl.multiple_of(c0, bc), bc)
    return jnp.minimum(c0 + jnp.arange(bc, dtype=jnp.int32), c_total - 1)


def _even_odd_cols(c0, width):
    """The even and the odd columns of c0 .. c0+width, as two stride-2 slices."""
    return tuple(pl.ds(c0 + parity, width // 2, stride=2) for parity in (0, 1))


def _fwd_kernel(x_ref, w_ref, *scale_refs, store, m, n, k, bs, cfg, aligned, double_quant, dtype):
    """o[rows, cols] = sum_k x[rows, k] * W[cols, k] over this program's reduction slice."""
    bm, bn, bk = cfg.block_m, cfg.block_n, cfg.block_k
    tm, tn = _grouped_pid(pl.program_id(0), pl.cdiv(m, bm), pl.cdiv(n, bn), cfg.group_m)
    rows = jnp.minimum(tm * bm + jnp.arange(bm, dtype=jnp.int32), m - 1)
    cols = jnp.minimum(tn * bn + jnp.arange(bn, dtype=jnp.int32), n - 1)
    decode = dict(bs=bs, k_total=k, double_quant=double_quant, decode=cfg.decode, dtype=dtype)

    def product(wt, xt):
        if cfg.weight_lhs:  # (x W^T)^T = W x^T, [bn, bm]
            return _dot(wt, xt, dtype)
        return _dot(xt, wt, dtype)

    def body(kt, acc):
        k0 = pl.multiple_of(kt * bk, bk)
        if aligned and not cfg.interleave:  # even K columns of W against even ones of x, odd with odd
            w_halves = _weight_tile_halves(w_ref, scale_refs, cols, k0, bk, **decode)
            for wt, cols_x in zip(w_halves, _even_odd_cols(k0, bk)):
                acc = acc + product(wt, x_ref[rows, cols_x])
            return acc
        if k % bk == 0:
            xt = x_ref[rows, pl.ds(k0, bk)]
        else:  # ragged reduction edge: clamp the load, zero the columns past K
            kk = k0 + jnp.arange(bk, dtype=jnp.int32)
            xt = x_ref[rows[:, None], jnp.minimum(kk, k - 1)[None, :]]
            xt = jnp.where((kk < k)[None, :], xt, 0).astype(dtype)
        tile = _weight_tile_rows if aligned else _weight_tile_flat
        return acc + product(tile(w_ref, scale_refs, cols, k0, bk, **decode), xt)

    acc = _reduce(body, pl.cdiv(k, bk), cfg.split_k, _zeros(bn, bm) if cfg.weight_lhs else _zeros(bm, bn))
    store([(_out_index(rows, _tile_cols(tn * bn, bn, n)), acc.T if cfg.weight_lhs else acc)])


def _dx_kernel(dy_ref, w_ref, *scale_refs, store, m, n, k, bs, cfg, aligned, double_quant, dtype):
    """dx[rows, ks] = sum_n dy[rows, n] * W[n, ks] over this program's slice of N."""
    bm, bn, bk = cfg.block_m, cfg.block_n, cfg.block_k
    tm, tk = _grouped_pid(pl.program_id(0), pl.cdiv(m, bm), pl.cdiv(k, bk), cfg.group_m)
    rows = jnp.minimum(tm * bm + jnp.arange(bm, dtype=jnp.int32), m - 1)
    k0 = pl.multiple_of(tk * bk, bk)
    decode = dict(bs=bs, k_total=k, double_quant=double_quant, decode=cfg.decode, dtype=dtype)
    halves = aligned and not cfg.interleave  # one accumulator for the even output columns, one for the odd
    width = bk // 2 if halves else bk

    def product(wt, dyt):
        if cfg.weight_lhs:  # (dy W)^T = W^T dy^T, [width, bm]
            return _dot_tn(wt, dyt, dtype)
        return _dot_nn(dyt, wt, dtype)

    def body(nt, accs):
        n0 = pl.multiple_of(nt * bn, bn)
        if n % bn == 0:
            wrows = n0 + jnp.arange(bn, dtype=jnp.int32)
            dyt = dy_ref[rows, pl.ds(n0, bn)]
        else:  # ragged reduction edge: clamp rows of W, zero the matching dy columns
            nn = n0 + jnp.arange(bn, dtype=jnp.int32)
            wrows = jnp.minimum(nn, n - 1)
            dyt = jnp.where((nn < n)[None, :], dy_ref[rows[:, None], wrows[None, :]], 0).astype(dtype)
        if halves:
            w_parts = _weight_tile_halves(w_ref, scale_refs, wrows, k0, bk, **decode)
        else:
            w_parts = ((_weight_tile_rows if aligned else _weight_tile_flat)(
                w_ref, scale_refs, wrows, k0, bk, **decode),)
        return tuple(acc + product(wt, dyt) for acc, wt in zip(accs, w_parts))

    init = _zeros(width, bm) if cfg.weight_lhs else _zeros(bm, width)
    accs = _reduce(body, pl.cdiv(n, bn), cfg.split_k, (init, init) if halves else (init,))
    if halves:
        col_parts = _even_odd_cols(k0, bk)
    else:
        col_parts = [_tile_cols(k0, bk, k)]
    store([(_out_index(rows, cols), acc.T if cfg.weight_lhs else acc) for acc, cols in zip(accs, col_parts)])


# ---- launch ----------------------------------------------------------------------------------------

def _num_sms() -> int:
    try:
        return int(getattr(jax.devices()[0], "core_count", 0)) or 132
    except Exception:  # noqa: BLE001 - no device info: assume an H100-class part
        return 132


def _pow2_at_most(v: int, cap: int) -> int:
    return max(16, min(cap, 1 << max(0, (int(v) - 1)).bit_length()))


def default_config(m: int, n_out: int, n_red: int, *, dtype=jnp.bfloat16, bs: int = 64,
                   dx: bool = False) -> TileConfig:
    """Tiles for an [m, n_red] x [n_red, n_out] product (forward: n_out=N, n_red=K; backward,
    `dx=True`: n_out=K, n_red=N). Chosen from the H100 sweeps in benchmarks/nf4_NOTES.md: few rows
    get a thin tile plus split-K to fill the SMs; many rows the largest tile that fit in shared
    memory (each decoded weight tile then serves 256 rows)."""
    if m <= 16:  # weight as right operand; nibbles interleaved for the forward, apart for dx (two sweeps);
        # bf16-rounded codes for 16-bit inputs: 13-26% faster on the large 8B projections at M=16 (H200, nf4_NOTES session 8)
        return TileConfig(16, 64, 128, 4, 4, 0, 8, few_rows_decode(dtype), False, interleave=not dx)
    if m <= 128 or dtype == jnp.float32:  # fp32 operands take twice the registers and SRAM
        return TileConfig(_pow2_at_most(m, 64), min(64, _pow2_at_most(n_out, 64)), 64, 4, 3, 0, 8,
                          "prmt", True)
    if m <= 256:
        return TileConfig(128, 128, 64, 8, 3, 1, 8, "prmt", True)
    return TileConfig(256, 64, 64, 4, 3, 1, 8, "prmt", False)


def _auto_split(tiles: int, steps: int) -> int:
    """Split the reduction (powers of two, >= 2 steps each) until every SM has ~2 programs."""
    split = 1
    while tiles * split < 2 * _num_sms() and split * 2 <= steps // 2:
        split *= 2
    return split


def _fit_block_k(cfg: TileConfig, k: int, bs: int, aligned: bool) -> TileConfig:
    """The fast path wants whole 64-blocks per tile and no ragged K edge: shrink block_k to fit."""
    bk = cfg.block_k
    if aligned:
        while bk > bs and (k % bk or bk % bs):
            bk //= 2
        if bk < bs or bk % bs or k % bk:
            bk = bs
    return dataclasses.replace(cfg, block_k=bk) if bk != cfg.block_k else cfg


_SELECT_TWIN = {"prmt": "select", "prmt16": "select16"}


def _runnable_decode(cfg, interpret: bool):
    """The Pallas interpreter cannot run PTX: it decodes with the select tree (same values).
    `cfg`: a TileConfig or an nf4_gemv.GemvConfig."""
    if interpret and cfg.decode in _SELECT_TWIN:
        return dataclasses.replace(cfg, decode=_SELECT_TWIN[cfg.decode])
    return cfg


def _scale_operands(q: NF4Tensor, aligned: bool, k: int):
    bs = q.blocksize
    if q.double_quant:
        qabs = q.absmax.reshape(-1, k // bs) if aligned else q.absmax
        return [qabs, q.nested_scale, q.nested_code, q.offset.reshape(1).astype(jnp.float32)]
    absmax = q.absmax.astype(jnp.float32)
    return [absmax.reshape(-1, k // bs) if aligned else absmax]


def _check(q, x, who):
    if not isinstance(q, NF4Tensor):
        raise TypeError(f"{who}: expected an NF4Tensor, got {type(q).__name__}.")
    if len(q.shape) != 2 or np.ndim(q.packed) != 1:
        raise ValueError(f"{who}: q must be one layer's 2-D [out, in] weight; got shape {q.shape} "
                         f"with leaves {np.shape(q.packed)} (index the layer axis first).")
    if x.shape[-1] != q.shape[1]:
        raise ValueError(f"{who}: x has {x.shape[-1]} features but the weight is {q.shape} ([out, in]).")


def _launch(kernel, a, q, out_cols, red, cfg, interpret, out_dtype):
    """Shared launcher: a [m, .] times the decoded weight; out [m, out_cols]."""
    m = a.shape[0]
    n, k, bs = q.shape[0], q.shape[1], q.blocksize
    aligned = k % bs == 0
    cfg = _fit_block_k(cfg, k, bs, aligned)
    out_tile = cfg.block_k if kernel is _dx_kernel else cfg.block_n
    steps = pl.cdiv(red, cfg.block_n if kernel is _dx_kernel else cfg.block_k)
    tiles = pl.cdiv(m, cfg.block_m) * pl.cdiv(out_cols, out_tile)
    split = cfg.split_k or _auto_split(tiles, steps)
    if not cfg.split_k and m <= 16:  # few rows: also at most ~512 reduction elements a program
        split = max(split, 1 << (max(1, red // 512).bit_length() - 1))  # (H200 M=16 sweeps, nf4_NOTES session 11)
    split = max(1, min(split, steps))
    while steps % split:
        split -= 1
    if split != cfg.split_k:
        cfg = dataclasses.replace(cfg, split_k=split)
    cfg = _runnable_decode(cfg, interpret)
    w = q.packed.reshape(n, k // 2) if aligned else q.packed
    operands = [a, w, *_scale_operands(q, aligned, k)]
    grid = (pl.cdiv(m, cfg.block_m) * pl.cdiv(out_cols, out_tile), cfg.split_k)
    body = functools.partial(kernel, m=m, n=n, k=k, bs=bs, cfg=cfg, aligned=aligned,
                             double_quant=q.double_quant, dtype=a.dtype)
    return split_pallas_call(
        body, operands, jax.ShapeDtypeStruct((m, out_cols), out_dtype), grid=grid, split=cfg.split_k,
        sum_in_kernel=cfg.sum_in_kernel, interpret=interpret, name=f"nf4_{'dx' if kernel is _dx_kernel else 'fwd'}",
        compiler_params=None if interpret else compat.triton_compiler_params(
            num_warps=cfg.num_warps, num_stages=cfg.num_stages))


def _few_rows_kernels(m, q, cfg):
    """The CUDA-core kernels module (`nf4_gemv`) when they take this product: asked for by a
    `GemvConfig`, or by default for at most `GEMV_MAX_ROWS` rows of whole 64-blocks."""
    from pallas_kernels import nf4_gemv

    if isinstance(cfg, nf4_gemv.GemvConfig):
        return nf4_gemv
    if cfg is None and m <= nf4_gemv.GEMV_MAX_ROWS and nf4_gemv.supports(q):
        return nf4_gemv
    return None


def _forward(x, q, interpret, cfg):
    lead, k = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, k)
    n = q.shape[0]
    if x2.shape[0] == 0:
        return jnp.zeros((*lead, n), x.dtype)
    gemv = _few_rows_kernels(x2.shape[0], q, cfg)
    if gemv:
        y = gemv.gemv_forward(x2, q, interpret=interpret, cfg=cfg)
    else:
        cfg = cfg or default_config(x2.shape[0], n, k, dtype=x.dtype, bs=q.blocksize)
        y = _launch(_fwd_kernel, x2, q, n, k, cfg, interpret, x.dtype)
    return y.reshape(*lead, n)


def _backward_dx(dy, q, interpret, cfg, x_dtype):
    n, k = q.shape
    lead = dy.shape[:-1]
    dy2 = dy.reshape(-1, n).astype(x_dtype)
    if dy2.shape[0] == 0:
        return jnp.zeros((*lead, k), x_dtype)
    gemv = _few_rows_kernels(dy2.shape[0], q, cfg)
    if gemv:
        dx = gemv.gemv_dx(dy2, q, interpret=interpret, cfg=cfg)
    else:
        cfg = cfg or default_config(dy2.shape[0], k, n, dtype=x_dtype, bs=q.blocksize, dx=True)
        dx = _launch(_dx_kernel, dy2, q, k, n, cfg, interpret, x_dtype)
    return dx.reshape(*lead, k)


def _zero_cotangent(q):
    """Zeros for q's float leaves, float0 for its integer leaves: the weight is frozen."""
    def zero(a):
        if jnp.issubdtype(a.dtype, jnp.inexact):
            return jnp.zeros_like(a)
        return np.zeros(a.shape, dtype=jax.dtypes.float0)
    return jax.tree.map(zero, q)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _nf4_matmul(x, q, interpret, fwd_config, dx_config):
    return _forward(x, q, interpret, fwd_config)


def _nf4_matmul_fwd(x, q, interpret, fwd_config, dx_config):
    return _forward(x, q, interpret, fwd_config), (q, jnp.zeros((0,), x.dtype))


def _nf4_matmul_bwd(interpret, fwd_config, dx_config, res, dy):
    q, x_proto = res
    return _backward_dx(dy, q, interpret, dx_config, x_proto.dtype), _zero_cotangent(q)


_nf4_matmul.defvjp(_nf4_matmul_fwd, _nf4_matmul_bwd)


def nf4_matmul(x, q: NF4Tensor, *, interpret: bool = False, fwd_config: Optional[TileConfig] = None,
               dx_config: Optional[TileConfig] = None):
    """x [..., in] @ dequantize(q).T -> [..., out] in x's dtype, dequantization fused (Pallas).

    Differentiable in x (dx = dy @ dequantize(q), fused the same way); q gets a zero cotangent.
    Up to `nf4_gemv.GEMV_MAX_ROWS` rows (decoding) run the CUDA-core kernels of `nf4_gemv`, more
    rows the MMA kernels here. `fwd_config` / `dx_config` override the choice and the tiles: a
    `TileConfig` forces the MMA kernels, an `nf4_gemv.GemvConfig` the CUDA-core ones."""
    _check(q, x, "nf4_matmul")
    return _nf4_matmul(x, q, interpret, fwd_config, dx_config)


# ---- dequantize, then a cuBLAS matmul (many rows) --------------------------------------------------

def _dequant_kernel(w_ref, *refs, n, k, bs, bn, bk, double_quant, decode, dtype, transpose):
    *scale_refs, o_ref = refs
    rows = jnp.minimum(pl.program_id(0) * bn + jnp.arange(bn, dtype=jnp.int32), n - 1)
    k0 = pl.multiple_of(pl.program_id(1) * bk, bk)
    tile = _weight_tile_rows(w_ref, scale_refs, rows, k0, bk, bs=bs, k_total=k,
                             double_quant=double_quant, decode=decode, dtype=dtype)
    if transpose:
        cols = k0 + jnp.arange(bk, dtype=jnp.int32)
        o_ref[cols[:, None], rows[None, :]] = tile.T
    else:
        o_ref[rows, pl.ds(k0, bk)] = tile


def nf4_dequantize(q: NF4Tensor, dtype=jnp.bfloat16, *, transpose: bool = False,
                   interpret: bool = False, tiles: TileConfig = TileConfig(32, 32, 256, 4, 1, 1, 1)):
    """dequantize_nf4(q, dtype) (or its transpose, [in, out]) as one Pallas pass: read the 4-bit
    codes, write `dtype`; the same values, at memory speed instead of XLA's table gathers.
    `tiles.block_m` x `tiles.block_k` is the tile of the weight each program writes (32 x 256:
    2.1 TB/s on the H100, the best of six tiles in benchmarks/nf4_NOTES.md run 4).
    K % 64 != 0 falls back to XLA."""
    n, k, bs = q.shape[0], q.shape[1], q.blocksize
    if k % bs:
        w = dequantize_nf4(q, dtype)
        return w.T if transpose else w
    cfg = _runnable_decode(_fit_block_k(tiles, k, bs, True), interpret)
    bn, bk = min(cfg.block_m, _pow2_at_most(n, cfg.block_m)), cfg.block_k
    body = functools.partial(_dequant_kernel, n=n, k=k, bs=bs, bn=bn, bk=bk,
                             double_quant=q.double_quant, decode=cfg.decode, dtype=dtype,
                             transpose=transpose)
    return pl.pallas_call(
        body, out_shape=jax.ShapeDtypeStruct((k, n) if transpose else (n, k), dtype), grid=(pl.cdiv(n, bn), k // bk),
        interpret=interpret, name="nf4_dequantize",
        compiler_params=None if interpret else compat.triton_compiler_params(
            num_warps=cfg.num_warps, num_stages=cfg.num_stages),
    )(q.packed.reshape(n, k // 2), *_scale_operands(q, True, k))


def _dense_product(a, w, spec, dtype):
    """The product written in `dtype` by the GEMM itself (cuBLAS accumulates 16-bit products in
    fp32 and rounds once, as the reference does): asking for fp32 and converting after cost a
    separate pass over a 4-byte output (+70-140 us at 2048 x 14336 on the H100)."""
    prec = jax.lax.Precision.HIGHEST if dtype == jnp.float32 else None
    return jnp.einsum(spec, a, w, precision=prec).astype(dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def dequant_matmul(x, q: NF4Tensor, interpret: bool = False):
    """x @ dequantize(q).T through `nf4_dequantize` and XLA's matmul. The bf16 weight lives only
    for the duration of one product: the backward dequantizes again instead of saving it, so a
    QLoRA model never holds more than one layer's weight in 16 bits."""
    # The forward writes the weight [in, out], so that XLA's matmul reads both operands untransposed.
    w_t = nf4_dequantize(q, x.dtype, transpose=True, interpret=interpret)
    return _dense_product(x, w_t, "...k,kn->...n", x.dtype)


def _dequant_matmul_fwd(x, q, interpret):
    return dequant_matmul(x, q, interpret), (q, jnp.zeros((0,), x.dtype))


def _dequant_matmul_bwd(interpret, res, dy):
    q, x_proto = res
    w = nf4_dequantize(q, x_proto.dtype, interpret=interpret)
    return _dense_product(dy.astype(x_proto.dtype), w, "...n,nk->...k", x_proto.dtype), _zero_cotangent(q)


dequant_matmul.defvjp(_dequant_matmul_fwd, _dequant_matmul_bwd)


# Most rows for which the base projection uses the fused kernel; above, it dequantizes one weight
# (Pallas, ~2 TB/s) and calls cuBLAS. Measured on the H100 (benchmarks/nf4_NOTES.md, runs 3-5):
# fused faster at M <= 64 (bytes dominate), dequantize + cuBLAS faster from M = 256 (MMAs do).
KERNEL_MAX_ROWS = 64


def nf4_linear(x, q: NF4Tensor):
    """The base projection of a QLoRA layer: on GPU the fused kernel up to KERNEL_MAX_ROWS rows,
    `dequant_matmul` above; the jnp reference on CPU; under the Pallas interpreter
    (UNSLOTH_JAX_KERNELS=interpret) the fused kernel for every M."""
    mode = compat.kernel_mode()
    _check(q, x, "nf4_linear")
    if mode == "reference":
        return nf4_matmul_reference(x, q)
    if mode == "pallas" and math.prod(x.shape[:-1]) > KERNEL_MAX_ROWS:
        return dequant_matmul(x, q)
    return nf4_matmul(x, q, interpret=(mode == "interpret"))
