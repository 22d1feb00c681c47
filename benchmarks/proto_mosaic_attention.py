"""Prototype v2: causal GQA flash-attention forward with RoPE inside, Mosaic GPU, warp-specialized:
a producer warpgroup brings K/V/cos/sin in by TMA and rotates each K tile once in shared memory;
two consumer warpgroups (64 query rows each) run QK^T and PV on wgmma."""
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


def mosaic_forward(q, k, v, cos, sin, *, scale, bk=64, stages=2, interpret=None, rot_rows=64,
                   regs=None, p_in_smem=False, rotate_k=True, rotate_q=True, reuse_q_smem=False,
                   skip_waits=True):
    """q [B, T, Hq, D], k/v [B, T, Hkv, D] (D = 128, T % 128 == 0), cos/sin [B|1, T, D/2] float16.
    Returns o [B, T, Hq, D] and lse [B, Hq, T] (base 2 of the scaled logits).

    Debug switches (for bisecting on the GPU):
      regs: None, or (consumer, producer) registers per thread for setmaxnreg; the two must satisfy
        2*128*c + 128*p <= 65536 (64512 = 168 * 384 is what the JAX FA3 kernel uses: 232/40).
      p_in_smem: P goes through shared memory (the path the interpreter verifies) instead of
        registers as the wgmma A operand. Forced under the interpreter.
      rotate_k / rotate_q: False skips the RoPE rotation of K (producer) / Q (consumers): the
        caller passes pre-rotated k / q then, so the result is still checkable.
      reuse_q_smem: the output tile goes out through the consumer's Q buffer instead of its own
        buffer (32 KB less shared memory: room for stages=3).
      skip_waits: the lower-row consumer waits on the K/V barriers of the steps it skips (the
        interpreter requires every phase observed); False = JAX FA3 style, it only arrives."""
    B, T, Hq, D = q.shape
    Hkv = k.shape[2]
    G = Hq // Hkv
    half, bq, cta_q = D // 2, 64, 128
    assert D == 128 and T % cta_q == 0 and T % bk == 0
    table_b = cos.shape[0]
    interp = interpret is not None
    p_smem = p_in_smem or interp
    if regs is not None:
        assert all(r % 8 == 0 and 24 <= r <= 256 for r in regs), regs
        assert 256 * regs[0] + 128 * regs[1] <= 65536, regs

    def cast(x, layout):
        return x if interp else plgpu.layout_cast(x, layout)

    def iota(dim):
        if interp:
            return lax.broadcasted_iota(jnp.int32, (bq, bk), dim)
        return plgpu.broadcasted_iota(jnp.int32, (bq, bk), dim, layout=plgpu.Layout.WGMMA)

    def rotate(x_parts, c_ref, s_ref, rows, chunk):
        for r0 in range(0, rows, chunk):
            sl = pl.ds(r0, chunk)
            x1 = x_parts.at[0, sl][...].astype(jnp.float32)
            x2 = x_parts.at[1, sl][...].astype(jnp.float32)
            c = c_ref.at[sl][...].astype(jnp.float32)
            s = s_ref.at[sl][...].astype(jnp.float32)
            x_parts.at[0, sl][...] = (x1 * c - x2 * s).astype(x_parts.dtype)
            x_parts.at[1, sl][...] = (x2 * c + x1 * s).astype(x_parts.dtype)

    def kernel(q_ref, k_ref, v_ref, cos_ref, sin_ref, o_ref, lse_ref, scratch):
        (qh, cq, sq, kh, ck, sk, vs, ps, os_, lses), (qbar, kraw, kready, vbar, consumed) = scratch
        h, qi, b = lax.axis_index("h"), lax.axis_index("q"), lax.axis_index("b")
        wg = lax.axis_index("wg")
        kvh = lax.div(h, jnp.int32(G))
        tb = b if table_b > 1 else 0
        kv_max = lax.div(qi * cta_q + cta_q + bk - 1, jnp.int32(bk))

        @pl.when(wg < 2)
        def _consumer():
            if regs and not interp:
                plgpu.set_max_registers(regs[0], action="increase")
            q0 = qi * cta_q + wg * bq
            my_q, my_cq, my_sq, my_bar = qh.at[wg], cq.at[wg], sq.at[wg], qbar.at[wg]
            for part in range(2):
                plgpu.copy_gmem_to_smem(q_ref.at[b, pl.ds(q0, bq), h, pl.ds(part * half, half)], my_q.at[part], my_bar)
            plgpu.copy_gmem_to_smem(cos_ref.at[tb, pl.ds(q0, bq)], my_cq, my_bar)
            plgpu.copy_gmem_to_smem(sin_ref.at[tb, pl.ds(q0, bq)], my_sq, my_bar)
            plgpu.barrier_wait(my_bar)
            if rotate_q:
                rotate(my_q, my_cq, my_sq, bq, bq)
                plgpu.commit_smem()  # generic-proxy writes -> visible to wgmma (async proxy)
            kv_steps = lax.div(q0 + bq + bk - 1, jnp.int32(bk))

            def step(j, carry, masked):
                o, m, l = carry
                slot = lax.rem(j, jnp.int32(stages))
                plgpu.barrier_wait(kready.at[slot])
                if interp:  # the interpreter's wgmma takes no transposed operand
                    s = sum(lax.dot_general(my_q.at[p][...], kh.at[slot, p][...], (((1,), (1,)), ((), ())),
                                            preferred_element_type=jnp.float32) for p in range(2))
                else:
                    def qk(acc):
                        for p in range(2):
                            plgpu.wgmma(acc, my_q.at[p], plgpu.transpose_ref(kh.at[slot, p], (1, 0)))
                        plgpu.wgmma_wait(0)
                        return acc[...]
                    s = pl.run_scoped(qk, plgpu.ACC((bq, bk), jnp.float32))
                s = s * (scale * LOG2E)
                if masked:
                    s = jnp.where(iota(0) + q0 >= iota(1) + j * bk, s, -jnp.inf)
                m_new = jnp.maximum(m, s.max(axis=1))
                alpha = jnp.exp2(m - m_new)
                p16 = jnp.exp2(s - lax.broadcast_in_dim(m_new, s.shape, [0]))
                l = l * alpha + p16.sum(axis=1)
                p16 = p16.astype(q.dtype)
                o = o * lax.broadcast_in_dim(alpha, o.shape, [0])
                plgpu.barrier_wait(vbar.at[slot])
                if p_smem:
                    ps.at[wg][...] = p16
                    plgpu.commit_smem()  # generic-proxy writes of P -> visible to wgmma

                    def pv(acc):
                        plgpu.wgmma(acc, ps.at[wg], vs.at[slot])
                        return acc[...]
                    o = o + pl.run_scoped(pv, plgpu.ACC((bq, D), jnp.float32))
                else:
                    def pv(acc_ref):
                        plgpu.wgmma(acc_ref, p16, vs.at[slot])
                    o = pl.run_state(pv)(plgpu.ACC.init(o))
                plgpu.barrier_arrive(consumed.at[slot])
                return o, m_new, l

            o = cast(jnp.zeros((bq, D), jnp.float32), plgpu.Layout.WGMMA)
            m = cast(jnp.full((bq,), -jnp.inf, jnp.float32), plgpu.Layout.WGMMA.reduce(1))
            l = cast(jnp.zeros((bq,), jnp.float32), plgpu.Layout.WGMMA.reduce(1))
            first_masked = lax.div(q0, jnp.int32(bk))
            carry = lax.fori_loop(0, first_masked, functools.partial(step, masked=False), (o, m, l))
            o, m, l = lax.fori_loop(first_masked, kv_steps, functools.partial(step, masked=True), carry)

            def skip(j, _):  # steps the other consumer still needs: keep the barriers' phases in step
                slot = lax.rem(j, jnp.int32(stages))
                if skip_waits:
                    plgpu.barrier_wait(kready.at[slot])
                    plgpu.barrier_wait(vbar.at[slot])
                plgpu.barrier_arrive(consumed.at[slot])
            lax.fori_loop(kv_steps, kv_max, skip, None)

            o = (o / lax.broadcast_in_dim(l, o.shape, [0])).astype(q.dtype)
            if reuse_q_smem:  # all wgmmas reading this consumer's Q are complete (waited)
                for part in range(2):
                    my_q.at[part][...] = o[:, part * half:(part + 1) * half]
            else:
                os_.at[wg][...] = o
            lses.at[wg][...] = m + jnp.log2(l)
            plgpu.commit_smem()
            if reuse_q_smem:
                for part in range(2):
                    plgpu.copy_smem_to_gmem(my_q.at[part], o_ref.at[b, pl.ds(q0, bq), h, pl.ds(part * half, half)])
            else:
                plgpu.copy_smem_to_gmem(os_.at[wg], o_ref.at[b, pl.ds(q0, bq), h])
            plgpu.copy_smem_to_gmem(lses.at[wg], lse_ref.at[b, h, pl.ds(q0, bq)])
            plgpu.wait_smem_to_gmem(0)

        @pl.when(wg == 2)
        def _producer():
            if regs and not interp:
                plgpu.set_max_registers(regs[1], action="decrease")

            def issue(step, slot):
                rows = pl.ds(step * bk, bk)
                for part in range(2):
                    plgpu.copy_gmem_to_smem(k_ref.at[b, rows, kvh, pl.ds(part * half, half)], kh.at[slot, part], kraw.at[slot])
                plgpu.copy_gmem_to_smem(cos_ref.at[tb, rows], ck.at[slot], kraw.at[slot])
                plgpu.copy_gmem_to_smem(sin_ref.at[tb, rows], sk.at[slot], kraw.at[slot])
                plgpu.copy_gmem_to_smem(v_ref.at[b, rows, kvh], vs.at[slot], vbar.at[slot])

            for s_ in range(min(stages, T // bk)):  # static bound: no out-of-range slice is traced
                @pl.when(s_ < kv_max)
                def _():
                    issue(s_, s_)

            def body(j, _):
                slot = lax.rem(j, jnp.int32(stages))
                plgpu.barrier_wait(kraw.at[slot])
                if rotate_k:
                    rotate(kh.at[slot], ck.at[slot], sk.at[slot], bk, rot_rows)
                    plgpu.commit_smem()  # fence.proxy.async + warpgroup barrier before the release
                plgpu.barrier_arrive(kready.at[slot])
                refill = j - 1 + stages  # the step that goes where step j - 1 was

                @pl.when((j >= 1) & (refill < kv_max))
                def _():
                    prev = lax.rem(j - 1, jnp.int32(stages))
                    plgpu.barrier_wait(consumed.at[prev])
                    issue(refill, prev)
            lax.fori_loop(0, kv_max, body, None)

            def drain(j, _):  # the last steps' slots are not refilled: observe their release anyway
                plgpu.barrier_wait(consumed.at[lax.rem(j, jnp.int32(stages))])
            lax.fori_loop(jnp.maximum(kv_max - stages, 0), kv_max, drain, None)

    def entry(q_ref, k_ref, v_ref, cos_ref, sin_ref, o_ref, lse_ref):
        smem = lambda shape, dt: plgpu.SMEM(shape, dt, transforms=_tiles())  # noqa: E731
        buffers = (smem((2, 2, bq, half), q.dtype), smem((2, bq, half), cos.dtype), smem((2, bq, half), sin.dtype),
                   smem((stages, 2, bk, half), k.dtype), smem((stages, bk, half), cos.dtype),
                   smem((stages, bk, half), sin.dtype), smem((stages, bk, D), v.dtype),
                   smem((2, bq, bk), q.dtype) if p_smem else None,
                   None if reuse_q_smem else smem((2, bq, D), q.dtype),
                   plgpu.SMEM((2, bq), jnp.float32))
        barriers = (plgpu.Barrier(num_arrivals=4, num_barriers=2), plgpu.Barrier(num_arrivals=4, num_barriers=stages),
                    plgpu.Barrier(num_arrivals=1, num_barriers=stages), plgpu.Barrier(num_arrivals=1, num_barriers=stages),
                    plgpu.Barrier(num_arrivals=2, num_barriers=stages))
        pl.run_scoped(lambda *scr: kernel(q_ref, k_ref, v_ref, cos_ref, sin_ref, o_ref, lse_ref, scr),
                      buffers, barriers, collective_axes="wg")

    f = plgpu.kernel(
        entry,
        out_type=(jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((B, Hq, T), jnp.float32)),
        grid=(Hq, T // cta_q, B), grid_names=("h", "q", "b"), num_threads=3, thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=interpret,
    )
    return f(q, k, v, cos, sin)


def example_inputs(B, T, Hq, Hkv, D=128, *, rotate_q=True, rotate_k=True, seed=0, dtype=jnp.bfloat16):
    """Random q/k/v, the float16 cos/sin tables the kernel takes, inv_freq for the reference, and
    the kernel's q/k arguments: pre-rotated (on the host, float32 math) where the kernel is told not
    to rotate, so every flag combination is checked against the same RoPE reference."""
    from pallas_kernels.attention import apply_rope, rope_cos_sin
    ks = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(ks[0], (B, T, Hq, D), dtype)
    k = jax.random.normal(ks[1], (B, T, Hkv, D), dtype)
    v = jax.random.normal(ks[2], (B, T, Hkv, D), dtype)
    inv_freq = 1.0 / (500000.0 ** (jnp.arange(0, D, 2, dtype=jnp.float32) / D))
    ang = jnp.arange(T, dtype=jnp.float32)[None, :, None] * inv_freq
    cos, sin = jnp.cos(ang).astype(jnp.float16), jnp.sin(ang).astype(jnp.float16)
    c32, s32 = rope_cos_sin(jnp.broadcast_to(jnp.arange(T), (1, T)), inv_freq)
    qk = q if rotate_q else apply_rope(q, c32, s32)
    kk = k if rotate_k else apply_rope(k, c32, s32)
    return dict(q=q, k=k, v=v, cos=cos, sin=sin, inv_freq=inv_freq, q_in=qk, k_in=kk)
