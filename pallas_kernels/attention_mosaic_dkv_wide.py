"""dK and dV of causal GQA flash attention at D = 256 (Gemma's heads; attention_mosaic.WIDE_HEAD_DIM), as
a Mosaic GPU kernel (Hopper: wgmma, TMA, warp specialization). The D = 128 kernel (attention_mosaic_dkv)
gives each consumer warpgroup 64 keys over all of D; at D = 256 its dK and dV accumulators would be 256
fp32 registers a thread. Here both consumers own the same 64 keys and split D instead.

Per (kv head, 64-key block, batch) CTA, computed transposed (keys x queries) per 64x64 tile, over the G
query heads of the group and the query tiles from the diagonal on (the diagonal tile masked):
  S^T = K Q^T, P^T = exp2(S^T scale log2e - lse), dP^T = V dO^T, dS^T = P^T (dP^T - delta),
  dV[:, half w] += P^T dO[:, half w], dK[:, half w] += dS^T Q[:, half w]      (consumer w = 0, 1)
Each consumer computes the whole S^T and dP^T tile (over all of D) itself: 1.5x the tensor work of an
undivided tile (6 of the 4 units a key tile needs), for no exchange between the consumers; their
accumulators (64x128 fp32 each) are the D = 128 kernel's register budget. P^T and dS^T are register A
operands. Three warpgroups: the producer TMA-loads K and V (halves of D) once, then per step one
64-row query tile (Q and dO halves, lse, delta rows, segment ids) into `stages` slots, refilled once
both consumers arrived on the slot's "consumed" barrier. At the end both consumers meet (each read
the other's K / V half) and write dK (scaled), dV through the K / V buffers. Packing: each CTA stops
after the last query tile sharing a segment with its keys and every tile is masked by segment.
No RoPE tables (flash_attention rotates q / k by XLA at D = 256; dk is then w.r.t. the rotated k).

Under JAX's Mosaic GPU interpreter (no transposed wgmma operand, no register A operand) every product
is a jnp dot of the shared-memory tiles (tests/test_attention_mosaic_wide.py)."""
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.attention_mosaic import (WIDE_HEAD_DIM, Values, block_index, check_regs, cta_grid, launch_kernel,
                                             probs_keys_first, run_consumers, segment_ranges, smem_tiles, soft_cap_grad,
                                             window_array)

TILE = 64  # keys per CTA, queries per step


def _dot(a, b, contract):  # the interpreter's products, float32
    return lax.dot_general(a, b, (contract, ((), ())), preferred_element_type=jnp.float32)


def mosaic_dkv_wide(q, k, v, do, lse, delta, seg=None, *, ranges=None, scale, stages=2, regs=(240, 24),
                    longest_first=True, window=None, softcap=None, interpret=None):
    """q/do [B, T, Hq, 256], k/v [B, T, Hkv, 256] (T % 64 == 0, 16-bit); lse/delta [B, Hq, T] float32
    (lse: log2-sum-exp2 over the visible keys of scale*log2(e)*q.k; delta = rowsum(dO*O)); seg [B, T]
    int32 segment ids or None (ranges: segment_ranges(seg, TILE)[1] if already computed). Returns dk, dv
    (k's shape and dtype). stages: query-tile slots in flight (2: K, V and two slots of Q, dO take
    192 KB of shared memory). regs: (consumer, producer) registers per thread for setmaxnreg, or None.
    longest_first: launch order (attention_mosaic.cta_grid: the first key blocks see the most queries).
    window, softcap: a sliding window W and a logit softcap c (or None), as attention_mosaic_dkv.mosaic_dkv's.
    interpret: InterpretGPUParams to run on the CPU."""
    B, T, Hq, D = q.shape
    Hkv = k.shape[2]
    G = Hq // Hkv
    t, half, nq = TILE, D // 2, T // TILE
    assert D == WIDE_HEAD_DIM and T % t == 0 and Hq % Hkv == 0, (q.shape, k.shape)
    segs = seg is not None
    windowed = window is not None
    interp = interpret is not None
    check_regs(regs)
    use_regs = regs is not None and not interp
    val = Values(interp)
    col_vec = functools.partial(val.vec, dim=1)  # a [t] vector along the queries (columns) of a tile

    def kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, seg_ref, rng_ref, win_ref, dk_ref, dv_ref, scratch):
        (qs, dos, lses, deltas, ks, vs, segk, segq), (qbar, consumed, kvbar, done) = scratch
        kvh, b = lax.axis_index("h"), lax.axis_index("b")
        kb = block_index("k", nq, longest_first, heavy_last=False)
        wg = lax.axis_index("wg")
        k0 = kb * t
        i_end = rng_ref[b, kb, 1] if segs else nq  # past the last query tile sharing a segment
        w_size = win_ref[0] if windowed else None
        if windowed:  # ... and past the tile of the last query the block's last key is visible to
            i_end = jnp.minimum(i_end, lax.div(k0 + t - 1 + w_size - 1, jnp.int32(t)) + 1)
        per_head = i_end - kb  # query tiles per head, from the diagonal (>= 1: each key sees itself)
        n_steps = G * per_head

        def tile_of(j):  # step -> (query head, query tile)
            return kvh * G + lax.div(j, per_head), kb + lax.rem(j, per_head)

        def slot_of(j):
            return lax.rem(j, jnp.int32(stages))

        def consumer(w):  # w: this consumer's half of D (0 or 1)
            plgpu.barrier_wait(kvbar)
            key_ids = val.vec(segk, 0) if segs else None

            def scores_t(slot, i, masked):
                """P^T [keys, queries] of step `slot`'s tile (float32) and dP^T (S^T = K Q^T and
                dP^T = V dO^T over all of D, both issued before either is read)."""
                q_parts, do_parts = qs.at[slot], dos.at[slot]
                if interp:  # no transposed wgmma operand in the interpreter
                    s_t = sum(_dot(ks.at[p][...], q_parts.at[p][...], ((1,), (1,))) for p in range(2))
                    dp_t = sum(_dot(vs.at[p][...], do_parts.at[p][...], ((1,), (1,))) for p in range(2))
                else:
                    def both(s_ref, dp_ref):
                        for p in range(2):
                            plgpu.wgmma(s_ref, ks.at[p], plgpu.transpose_ref(q_parts.at[p], (1, 0)))
                        for p in range(2):
                            plgpu.wgmma(dp_ref, vs.at[p], plgpu.transpose_ref(do_parts.at[p], (1, 0)))
                        plgpu.wgmma_wait(0)
                        return s_ref[...], dp_ref[...]
                    acc = plgpu.ACC((t, t), jnp.float32)
                    s_t, dp_t = pl.run_scoped(both, acc, acc)
                p_t, tanh = probs_keys_first(s_t, lambda: col_vec(lses.at[slot]), val, k0, i * t, scale=scale,
                                             masked=masked, softcap=softcap, window=w_size,
                                             seg=(key_ids, segq.at[slot]) if segs else None)
                return p_t, dp_t, tanh

            def step(j, accs, masked):
                dv, dk = accs
                slot = slot_of(j)
                plgpu.barrier_wait(qbar.at[slot])
                p_t, dp_t, tanh = scores_t(slot, tile_of(j)[1], masked)
                ds_t = soft_cap_grad(p_t * (dp_t - lax.broadcast_in_dim(col_vec(deltas.at[slot]), (t, t), [1])), tanh)
                p_t, ds_t = p_t.astype(q.dtype), ds_t.astype(q.dtype)
                my_do, my_q = dos.at[slot, w], qs.at[slot, w]
                if interp:
                    dv = dv + _dot(p_t, my_do[...], ((1,), (0,)))
                    dk = dk + _dot(ds_t, my_q[...], ((1,), (0,)))
                else:
                    def grads(refs):
                        plgpu.wgmma(refs[0], p_t, my_do)
                        plgpu.wgmma(refs[1], ds_t, my_q)
                    dv, dk = pl.run_state(grads)((plgpu.ACC.init(dv), plgpu.ACC.init(dk)))
                plgpu.barrier_arrive(consumed.at[slot])
                return dv, dk

            def head(g, accs):  # the diagonal tile masked (causal), the rest only by window / segment
                j0 = g * per_head
                accs = step(j0, accs, True)
                return lax.fori_loop(j0 + 1, j0 + per_head, lambda j, c: step(j, c, False), accs)

            zeros = val.cast(jnp.zeros((t, half), jnp.float32), plgpu.Layout.WGMMA)
            dv, dk = lax.fori_loop(0, G, head, (zeros, zeros))
            plgpu.barrier_arrive(done)  # both consumers read both halves of K and V until here
            plgpu.barrier_wait(done)
            ks.at[w][...] = (dk * scale).astype(ks.dtype)
            vs.at[w][...] = dv.astype(vs.dtype)
            plgpu.commit_smem()
            cols = pl.ds(w * half, half)
            plgpu.copy_smem_to_gmem(ks.at[w], dk_ref.at[b, pl.ds(k0, t), kvh, cols])
            plgpu.copy_smem_to_gmem(vs.at[w], dv_ref.at[b, pl.ds(k0, t), kvh, cols])
            plgpu.wait_smem_to_gmem(0)

        @pl.when(wg < 2)
        def _consumer():
            if use_regs:
                plgpu.set_max_registers(regs[0], action="increase")
            run_consumers(wg, consumer, static=True)

        @pl.when(wg == 2)
        def _producer():
            if use_regs:
                plgpu.set_max_registers(regs[1], action="decrease")
            keys = pl.ds(k0, t)
            for p in range(2):
                plgpu.copy_gmem_to_smem(k_ref.at[b, keys, kvh, pl.ds(p * half, half)], ks.at[p], kvbar)
                plgpu.copy_gmem_to_smem(v_ref.at[b, keys, kvh, pl.ds(p * half, half)], vs.at[p], kvbar)
            if segs:
                plgpu.copy_gmem_to_smem(seg_ref.at[b, keys], segk, kvbar)

            def issue(j, _):
                slot = slot_of(j)
                pl.when(j >= stages)(lambda: plgpu.barrier_wait(consumed.at[slot]))  # step j - stages is done
                h, i = tile_of(j)
                rows = pl.ds(i * t, t)
                for p in range(2):
                    cols = pl.ds(p * half, half)
                    plgpu.copy_gmem_to_smem(q_ref.at[b, rows, h, cols], qs.at[slot, p], qbar.at[slot])
                    plgpu.copy_gmem_to_smem(do_ref.at[b, rows, h, cols], dos.at[slot, p], qbar.at[slot])
                plgpu.copy_gmem_to_smem(lse_ref.at[b, h, rows], lses.at[slot], qbar.at[slot])
                plgpu.copy_gmem_to_smem(delta_ref.at[b, h, rows], deltas.at[slot], qbar.at[slot])
                if segs:
                    plgpu.copy_gmem_to_smem(seg_ref.at[b, rows], segq.at[slot], qbar.at[slot])
            lax.fori_loop(0, n_steps, issue, None)

            def drain(j, _):  # the last steps' slots are not refilled: observe their release anyway
                plgpu.barrier_wait(consumed.at[slot_of(j)])
            lax.fori_loop(jnp.maximum(n_steps - stages, 0), n_steps, drain, None)

    def entry(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs):
        refs = list(refs)
        seg_ref, rng_ref = (refs.pop(0), refs.pop(0)) if segs else (None, None)
        win_ref = refs.pop(0) if windowed else None
        dk_ref, dv_ref = refs
        smem = lambda shape, dt: plgpu.SMEM(shape, dt, transforms=smem_tiles())  # noqa: E731
        buffers = (smem((stages, 2, t, half), q.dtype), smem((stages, 2, t, half), do.dtype),
                   plgpu.SMEM((stages, t), jnp.float32), plgpu.SMEM((stages, t), jnp.float32),
                   smem((2, t, half), k.dtype), smem((2, t, half), v.dtype),
                   plgpu.SMEM((t,), jnp.int32) if segs else None,
                   plgpu.SMEM((stages, t), jnp.int32) if segs else None)
        barriers = (plgpu.Barrier(num_arrivals=6 + int(segs), num_barriers=stages),  # Q, dO halves, lse, delta (+ ids)
                    plgpu.Barrier(num_arrivals=2, num_barriers=stages),
                    plgpu.Barrier(num_arrivals=4 + int(segs)),  # K, V halves (+ ids)
                    plgpu.Barrier(num_arrivals=2))
        pl.run_scoped(lambda *scr: kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, seg_ref, rng_ref, win_ref,
                                          dk_ref, dv_ref, scr),
                      buffers, barriers, collective_axes="wg")

    grid, grid_names = cta_grid(Hkv, nq, B, "k", longest_first)
    out_type = [jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)]
    extra = (seg, segment_ranges(seg, TILE)[1] if ranges is None else ranges) if segs else ()
    extra += (window_array(window),) if windowed else ()
    launch = launch_kernel(entry, out_type, grid=grid, grid_names=grid_names, num_threads=3, thread_name="wg",
                           interpret=interpret, compiler_params=plgpu.CompilerParams(approx_math=True))
    return launch(q, k, v, do, lse, delta, *extra)
