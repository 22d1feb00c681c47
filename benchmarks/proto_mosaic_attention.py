"""Prototype: causal GQA flash-attention forward with RoPE inside, Mosaic GPU (wgmma + TMA)."""
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

LOG2E = math.log2(math.e)


def _tiles():
    return (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))


def mosaic_forward(q, k, v, cos, sin, *, scale, bq=64, bk=64, stages=2, interpret=None, rotate_k=True):
    """q [B, T, Hq, D], k/v [B, T, Hkv, D] (D = 128, T % bq == T % bk == 0), cos/sin [B|1, T, D/2]
    float16 (the RoPE tables). Returns o [B, T, Hq, D] and lse [B, Hq, T] (base 2, scaled logits)."""
    B, T, Hq, D = q.shape
    Hkv = k.shape[2]
    G = Hq // Hkv
    half = D // 2
    assert D == 128 and T % bq == 0 and T % bk == 0
    nq = T // bq
    table_b = cos.shape[0]

    def cast(x, layout):  # layouts are a compiled-only notion; the interpreter has none
        return x if interpret is not None else plgpu.layout_cast(x, layout)

    def iota(dim):
        if interpret is not None:
            return lax.broadcasted_iota(jnp.int32, (bq, bk), dim)
        return plgpu.broadcasted_iota(jnp.int32, (bq, bk), dim, layout=plgpu.Layout.WGMMA)

    def kernel(q_ref, k_ref, v_ref, cos_ref, sin_ref, o_ref, lse_ref,
               qh, kh, vs, cq, sq, ck, sk, ps, os_, lses, qbar, kbar, vbar):
        h, qi, b = lax.axis_index("h"), lax.axis_index("q"), lax.axis_index("b")
        kvh = lax.div(h, jnp.int32(G))
        tb = b if table_b > 1 else 0
        q0 = qi * bq
        kv_steps = lax.div(q0 + bq + bk - 1, jnp.int32(bk))

        # Q: both halves and the q rows' cos/sin, then rotate in place (float32 math).
        for part in range(2):
            plgpu.copy_gmem_to_smem(q_ref.at[b, pl.ds(q0, bq), h, pl.ds(part * half, half)], qh.at[part], qbar)
        plgpu.copy_gmem_to_smem(cos_ref.at[tb, pl.ds(q0, bq)], cq, qbar)
        plgpu.copy_gmem_to_smem(sin_ref.at[tb, pl.ds(q0, bq)], sq, qbar)

        def issue(step, slot):
            rows = pl.ds(step * bk, bk)
            for part in range(2):
                plgpu.copy_gmem_to_smem(k_ref.at[b, rows, kvh, pl.ds(part * half, half)], kh.at[slot, part], kbar.at[slot])
            plgpu.copy_gmem_to_smem(cos_ref.at[tb, rows], ck.at[slot], kbar.at[slot])
            plgpu.copy_gmem_to_smem(sin_ref.at[tb, rows], sk.at[slot], kbar.at[slot])
            plgpu.copy_gmem_to_smem(v_ref.at[b, rows, kvh], vs.at[slot], vbar.at[slot])

        for s in range(stages):
            @pl.when(s < kv_steps)
            def _():
                issue(s, s)

        def rotate(x_parts, c_ref, s_ref):
            x1 = x_parts.at[0][...].astype(jnp.float32)
            x2 = x_parts.at[1][...].astype(jnp.float32)
            c = c_ref[...].astype(jnp.float32)
            s = s_ref[...].astype(jnp.float32)
            x_parts.at[0][...] = (x1 * c - x2 * s).astype(x_parts.dtype)
            x_parts.at[1][...] = (x2 * c + x1 * s).astype(x_parts.dtype)

        plgpu.barrier_wait(qbar)
        rotate(qh, cq, sq)
        plgpu.commit_smem()

        def step(j, carry, masked):
            o, m, l = carry
            slot = lax.rem(j, jnp.int32(stages))
            plgpu.barrier_wait(kbar.at[slot])
            if rotate_k:  # False: a timing experiment only (wrong results)
                rotate(kh.at[slot], ck.at[slot], sk.at[slot])
                plgpu.commit_smem()

            def qk(acc):
                for part in range(2):
                    plgpu.wgmma(acc, qh.at[part], plgpu.transpose_ref(kh.at[slot, part], (1, 0)))
                plgpu.wgmma_wait(0)
                return acc[...]
            if interpret is None:
                s = pl.run_scoped(qk, plgpu.ACC((bq, bk), jnp.float32))
            else:  # the interpreter's wgmma takes no transposed operand: the same product in jnp
                s = sum(lax.dot_general(qh.at[part][...], kh.at[slot, part][...], (((1,), (1,)), ((), ())),
                                        preferred_element_type=jnp.float32) for part in range(2))
            s = s * (scale * LOG2E)
            if masked:
                qi_ = iota(0) + q0
                ki_ = iota(1) + j * bk
                s = jnp.where(qi_ >= ki_, s, -jnp.inf)
            m_new = jnp.maximum(m, s.max(axis=1))
            alpha = jnp.exp2(m - m_new)
            p = jnp.exp2(s - lax.broadcast_in_dim(m_new, s.shape, [0]))
            l = l * alpha + p.sum(axis=1)
            ps[...] = p.astype(ps.dtype)
            plgpu.commit_smem()
            plgpu.barrier_wait(vbar.at[slot])

            def pv(acc):
                plgpu.wgmma(acc, ps, vs.at[slot])
                plgpu.wgmma_wait(0)
                return acc[...]
            o = o * lax.broadcast_in_dim(alpha, o.shape, [0]) + pl.run_scoped(pv, plgpu.ACC((bq, D), jnp.float32))

            @pl.when(j + stages < kv_steps)
            def _():
                issue(j + stages, slot)
            return o, m_new, l

        o = cast(jnp.zeros((bq, D), jnp.float32), plgpu.Layout.WGMMA)
        m = cast(jnp.full((bq,), -jnp.inf, jnp.float32), plgpu.Layout.WGMMA.reduce(1))
        l = cast(jnp.zeros((bq,), jnp.float32), plgpu.Layout.WGMMA.reduce(1))
        first_masked = lax.div(q0, jnp.int32(bk))  # key blocks from here on cross the diagonal
        carry = lax.fori_loop(0, first_masked, functools.partial(step, masked=False), (o, m, l))
        o, m, l = lax.fori_loop(first_masked, kv_steps, functools.partial(step, masked=True), carry)

        os_[...] = (o / lax.broadcast_in_dim(l, o.shape, [0])).astype(os_.dtype)
        lses[...] = m + jnp.log2(l)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(os_, o_ref.at[b, pl.ds(q0, bq), h])
        plgpu.copy_smem_to_gmem(lses, lse_ref.at[b, h, pl.ds(q0, bq)])
        plgpu.wait_smem_to_gmem(0)

    smem = lambda shape, dt: plgpu.SMEM(shape, dt, transforms=_tiles())  # noqa: E731
    f = plgpu.kernel(
        kernel,
        out_type=(jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((B, Hq, T), jnp.float32)),
        scratch_types=[
            smem((2, bq, half), q.dtype), smem((stages, 2, bk, half), k.dtype), smem((stages, bk, D), v.dtype),
            smem((bq, half), cos.dtype), smem((bq, half), sin.dtype),
            smem((stages, bk, half), cos.dtype), smem((stages, bk, half), sin.dtype),
            smem((bq, bk), q.dtype), smem((bq, D), q.dtype), plgpu.SMEM((bq,), jnp.float32),
            plgpu.Barrier(num_arrivals=4), plgpu.Barrier(num_arrivals=4, num_barriers=stages),
            plgpu.Barrier(num_arrivals=1, num_barriers=stages)],
        grid=(Hq, nq, B), grid_names=("h", "q", "b"),
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=interpret,
    )
    return f(q, k, v, cos, sin)
