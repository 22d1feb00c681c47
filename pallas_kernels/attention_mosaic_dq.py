"""dQ of causal GQA flash attention with RoPE inside, as a Mosaic GPU kernel (Hopper: wgmma, TMA,
warp specialization). Companion of the forward in attention_mosaic.py, with the same shape; the math
is the Triton `_dq_kernel`'s of attention.py.

Structure: grid (Hq, T/128, B), three warpgroups per CTA (128 query rows of one head).
- The producer TMA-loads K halves (+ cos/sin) and V of each key tile (64 rows) up to the diagonal
  into `stages` slots, rotates each K tile once in shared memory (64-row chunks) and releases it on
  a "K ready" barrier; V has its own barrier. A slot is refilled once both consumers arrived on its
  "consumed" barrier.
- Two consumers (64 query rows each) TMA-load their Q halves, dO, lse, delta (+ cos/sin) once,
  rotate Q in shared memory, then per key tile j:
    S = Q_rot K_rot^T, P = exp2(S scale log2e - lse), dP = dO V^T, dS = P (dP - delta),
    dQ_rot += dS K_rot   (two 64-column halves, fp32 in registers)
  with dS (16-bit, registers) as the A operand of the dQ wgmmas. At the end dQ is scaled,
  un-rotated (the transpose of the rotation) and written through the Q buffer.
  Causal: only the last step (the diagonal 64x64 tile) is masked; the consumer of the lower rows
  runs one step fewer and keeps the barriers' phases in step for the other. Packing (segment ids):
  the CTA starts at its first key tile sharing a segment (`attention_mosaic.segment_ranges`) and
  every tile is masked by segment.

Under JAX's Mosaic GPU interpreter (no `layout_cast`, transposed wgmma operand, register A operand,
`run_state` or load with a layout), S and dP are jnp dots of the shared-memory tiles, dS goes
through shared memory and the dQ accumulators are plain values.
"""
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.attention_mosaic import (WIDE_HEAD_DIM, QTiles, Values, causal_kv_range, check_regs, for_each_tile,
                                             kv_producer, refuse_wide_tables, rotate_halves, run_consumers, scores_log2,
                                             segment_ranges, skip_kv_steps, sm_count, smem_tiles, soft_cap,
                                             soft_cap_grad, step_slot, window_array)

LOG2E = math.log2(math.e)
HEAD_DIM = 128
BLOCK_Q = 128  # query rows per CTA (two consumer warpgroups of 64)
BLOCK_K = 64


def mosaic_dq(q, k, v, do, lse, delta, cos=None, sin=None, seg=None, *, ranges=None, scale, stages=None, regs="auto",
              longest_first=True, ctas=None, key_block=BLOCK_K, pre_rotated=False, static_consumers=False,
              early_v=None, window=None, softcap=None, interpret=None):
    """q/do [B, T, Hq, D], k/v [B, T, Hkv, D] (D = 128 or 256, T % 128 == 0, 16-bit); lse/delta [B, Hq, T]
    float32 (lse: log2-sum-exp2 over the visible keys of scale*log2(e)*q_rot.k_rot; delta =
    rowsum(dO*O)); cos/sin [B|1, T, D/2] float16 or None (no RoPE); seg [B, T] int32 segment ids
    or None (ranges: segment_ranges(seg)[0] if already computed). Returns dq in q's shape and
    dtype (the gradient w.r.t. the un-rotated q).

    stages: K/V slots in flight; None: 2 with RoPE (3 would need 248 KB of shared memory, over
    the 227 KB limit) or 128-key steps, 3 otherwise. regs: (consumer, producer) registers per
    thread for setmaxnreg, or None; "auto": (240, 24) for 128-key steps (S, dP and dQ are 192 fp32
    registers a thread; the producer only issues copies), else None. longest_first: launch order
    (attention_mosaic.cta_grid). ctas: None, or a persistent kernel of that many CTAs ("sms": one
    per SM; attention_mosaic.QTiles). key_block: keys per step, 64 or 128 (without RoPE tables:
    half the steps, S / dP at N = 128 and dQ at K = 128, as the forward's 128-key steps; on the
    H200 0.95x / 0.97x of 64-key steps at 2k / 8k, where the forward gains 1.10x; likely the
    192 fp32 registers of S, dP and dQ a thread against the forward's 128, not yet profiled).
    pre_rotated: q and k come rotated (by XLA); cos/sin then only un-rotate dQ on its way out (no
    K tables, no rotation in shared memory; the Q rows' tables come on a barrier only the epilogue
    waits for), which saves XLA's separate un-rotation pass over dq. Measured 0.82x / 0.94x of dq
    without tables at 2k / 8k (RESULTS.md 000000000000); Tuning.rope_grad_in_kernel turns it on.
    static_consumers: each consumer warpgroup its own code, its Q / dO buffer descriptors immediates
    (attention_mosaic.run_consumers; the dk/dv kernel's default). Not timed here yet.
    early_v: each step issues dP = dO V^T first and hands V's slot back as soon as that wgmma is done
    (its own "V consumed" barrier), so the producer refills V while S, the softmax and dQ run; None:
    with a single slot (stages=1), where nothing else overlaps the loads.
    D = 256 (WIDE_HEAD_DIM): no RoPE tables, 64-key steps, stages 1 (Q and dO of 128 rows stay in
    shared memory: 128 KB, and one K/V slot is 64 KB), regs "auto" (240, 24) (S, dP and dQ: 192 fp32
    registers a thread, as 128-key steps at D = 128).
    window: a sliding window W or None, as attention_mosaic.mosaic_forward's; softcap: c or None, as
    its (dS then carries the cap's factor 1 - tanh^2).
    interpret: InterpretGPUParams to run on the CPU."""
    B, T, Hq, D = q.shape
    Hkv = k.shape[2]
    G = Hq // Hkv
    half, bq, cta_q, bk = D // 2, BLOCK_Q // 2, BLOCK_Q, key_block
    assert D in (HEAD_DIM, WIDE_HEAD_DIM) and T % cta_q == 0 and Hq % Hkv == 0, (q.shape, k.shape)
    assert bk in (64, 128), key_block
    wide = D == WIDE_HEAD_DIM
    refuse_wide_tables("mosaic_dq", D, cos)
    assert not wide or bk == 64, "D=256: key_block=64"
    rope = cos is not None
    rotate = rope and not pre_rotated  # the kernel rotates Q and K tiles (else only un-rotates dQ)
    segs = seg is not None
    windowed = window is not None
    if rope and bk == 128:
        raise ValueError("mosaic_dq: key_block=128 takes no RoPE tables (their slots would not fit in shared "
                         "memory); rotate q/k before the kernel (Tuning(rope_in_kernel=False))")
    if stages is None:
        stages = 1 if wide else 2 if rotate or bk == 128 else 3
    if regs == "auto":
        regs = (240, 24) if bk == 128 or wide else None
    if early_v is None:
        early_v = stages == 1
    table_b = cos.shape[0] if rope else 1
    interp = interpret is not None
    check_regs(regs)
    val = Values(interp)
    cast, vec = val.cast, val.vec
    tiles = QTiles(B, Hq, T // cta_q, sm_count() if ctas == "sms" else ctas, longest_first)

    def dot_t(a, b):  # a [m, k] . b [n, k]^T, for the interpreter
        return lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)

    def kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, cos_ref, sin_ref, seg_ref, rng_ref, win_ref, dq_ref,
               scratch):
        # cos_ref / sin_ref (and their buffers) are None without RoPE, seg_ref / rng_ref without segments
        ((qh, dos, cq, sq, kh, ck, sk, vs, dss, lses, deltas, segq, segk),
         (qbar, kraw, kready, vbar, consumed, tbar, v_consumed)) = scratch
        wg = lax.axis_index("wg")
        kbar = kready if rotate else kraw  # what a consumer waits for before reading a K tile

        kv_range = causal_kv_range(rng_ref, bk, win_ref)
        w_size = win_ref[0] if windowed else None

        def consumer(wg):  # wg: this consumer's index (0 or 1)
            my_q, my_do, my_bar = qh.at[wg], dos.at[wg], qbar.at[wg]
            my_cq, my_sq = (cq.at[wg], sq.at[wg]) if rope else (None, None)

            def run_tile(i, tile, kv_min, kv_max, off):
                del i
                qi, b, h = tile
                q0 = qi * cta_q + wg * bq
                rows = pl.ds(q0, bq)
                tb = b if table_b > 1 else 0
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the last dq left the Q buffer
                for part in range(2):
                    plgpu.copy_gmem_to_smem(q_ref.at[b, rows, h, pl.ds(part * half, half)], my_q.at[part], my_bar)
                plgpu.copy_gmem_to_smem(do_ref.at[b, rows, h], my_do, my_bar)
                plgpu.copy_gmem_to_smem(lse_ref.at[b, h, rows], lses.at[wg], my_bar)
                plgpu.copy_gmem_to_smem(delta_ref.at[b, h, rows], deltas.at[wg], my_bar)
                if rope:  # pre-rotated: on their own barrier, waited for only by the epilogue
                    table_bar = my_bar if rotate else tbar.at[wg]
                    plgpu.copy_gmem_to_smem(cos_ref.at[tb, rows], my_cq, table_bar)
                    plgpu.copy_gmem_to_smem(sin_ref.at[tb, rows], my_sq, table_bar)
                if segs:
                    plgpu.copy_gmem_to_smem(seg_ref.at[b, rows], segq.at[wg], my_bar)
                plgpu.barrier_wait(my_bar)
                if rotate:
                    rotate_halves(my_q, my_cq, my_sq, bq, bq)
                    plgpu.commit_smem()  # generic-proxy writes -> visible to wgmma (async proxy)
                lse_v = vec(lses.at[wg], 0)
                delta_v = vec(deltas.at[wg], 0)
                seg_rows = vec(segq.at[wg], 0) if segs else None
                kv_steps = lax.div(q0 + bq + bk - 1, jnp.int32(bk))

                def step(j, carry, masked):
                    dq0, dq1 = carry
                    slot = step_slot(j, off, stages)
                    if not early_v:
                        plgpu.barrier_wait(kbar.at[slot])
                    plgpu.barrier_wait(vbar.at[slot])
                    if interp:  # the interpreter's wgmma takes no transposed operand
                        dp = dot_t(my_do[...], vs.at[slot][...])
                        if early_v:
                            plgpu.barrier_arrive(v_consumed.at[slot])
                            plgpu.barrier_wait(kbar.at[slot])
                        s = sum(dot_t(my_q.at[p][...], kh.at[slot, p][...]) for p in range(2))
                    else:
                        def qk_dov(s_ref, dp_ref):  # both issued before either is read
                            plgpu.wgmma(dp_ref, my_do, plgpu.transpose_ref(vs.at[slot], (1, 0)))
                            if early_v:
                                plgpu.barrier_wait(kbar.at[slot])
                            for p in range(2):
                                plgpu.wgmma(s_ref, my_q.at[p], plgpu.transpose_ref(kh.at[slot, p], (1, 0)))
                            if early_v:  # one commit group per wgmma: dP's is done with 2 left
                                plgpu.wgmma_wait(2)
                                plgpu.barrier_arrive(v_consumed.at[slot])
                            plgpu.wgmma_wait(0)
                            return s_ref[...], dp_ref[...]
                        s, dp = pl.run_scoped(qk_dov, plgpu.ACC((bq, bk), jnp.float32), plgpu.ACC((bq, bk), jnp.float32))
                    tanh = None
                    if softcap:
                        s, tanh = soft_cap(s, scale, softcap)
                    s = scores_log2(s, 1.0 if softcap else scale, val, q0, j * bk, masked, seg_rows,
                                    vec(segk.at[slot], 1) if segs else None, window=w_size)
                    p_ = jnp.exp2(s - lax.broadcast_in_dim(lse_v, s.shape, [0]))
                    ds = soft_cap_grad(p_ * (dp - lax.broadcast_in_dim(delta_v, dp.shape, [0])), tanh).astype(k.dtype)
                    if interp:  # no register A operand: dS through shared memory
                        dss.at[wg][...] = ds
                        plgpu.commit_smem()  # generic-proxy writes of dS -> visible to wgmma

                        def dsk(acc, p):
                            plgpu.wgmma(acc, dss.at[wg], kh.at[slot, p])
                            return acc[...]
                        dq0 = dq0 + pl.run_scoped(functools.partial(dsk, p=0), plgpu.ACC((bq, half), jnp.float32))
                        dq1 = dq1 + pl.run_scoped(functools.partial(dsk, p=1), plgpu.ACC((bq, half), jnp.float32))
                    else:
                        def dsk(accs):
                            for p in range(2):
                                plgpu.wgmma(accs[p], ds, kh.at[slot, p])
                        dq0, dq1 = pl.run_state(dsk)((plgpu.ACC.init(dq0), plgpu.ACC.init(dq1)))
                    plgpu.barrier_arrive(consumed.at[slot])
                    return dq0, dq1

                zero = cast(jnp.zeros((bq, half), jnp.float32), plgpu.Layout.WGMMA)
                first_masked = kv_min if segs or windowed else lax.div(q0, jnp.int32(bk))  # else the diagonal on
                carry = lax.fori_loop(kv_min, first_masked, functools.partial(step, masked=False), (zero, zero))
                dq0, dq1 = lax.fori_loop(first_masked, kv_steps, functools.partial(step, masked=True), carry)

                skip_kv_steps((kbar, vbar, consumed), kv_steps, kv_max, off, stages,
                              v_consumed if early_v else None)

                dq0, dq1 = dq0 * scale, dq1 * scale
                if rope:  # gradient w.r.t. the un-rotated q: the transpose of the rotation
                    if not rotate:
                        plgpu.barrier_wait(tbar.at[wg])
                    c = my_cq[...].astype(jnp.float32)
                    s_ = my_sq[...].astype(jnp.float32)
                    dq0, dq1 = dq0 * c + dq1 * s_, dq1 * c - dq0 * s_
                # out through the Q buffer: every wgmma reading it was waited for
                my_q.at[0][...] = dq0.astype(my_q.dtype)
                my_q.at[1][...] = dq1.astype(my_q.dtype)
                plgpu.commit_smem()
                for part in range(2):
                    plgpu.copy_smem_to_gmem(my_q.at[part], dq_ref.at[b, rows, h, pl.ds(part * half, half)])

            for_each_tile(tiles, kv_range, run_tile)
            plgpu.wait_smem_to_gmem(0)

        @pl.when(wg < 2)
        def _consumer():
            if regs and not interp:
                plgpu.set_max_registers(regs[0], action="increase")
            run_consumers(wg, consumer, static_consumers)

        @pl.when(wg == 2)
        def _producer():
            if regs and not interp:
                plgpu.set_max_registers(regs[1], action="decrease")

            tables = (cos_ref, sin_ref) if rotate else (None, None)
            kv_producer((k_ref, v_ref, *tables, seg_ref), (kh, ck, sk, segk, vs),
                        (kraw, kready, vbar, consumed, v_consumed if early_v else None), tiles=tiles,
                        kv_range=kv_range, group=G, table_b=table_b, stages=stages, bk=bk)

    def entry(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs):
        refs = list(refs)
        cos_ref, sin_ref = (refs.pop(0), refs.pop(0)) if rope else (None, None)
        seg_ref, rng_ref = (refs.pop(0), refs.pop(0)) if segs else (None, None)
        win_ref = refs.pop(0) if windowed else None
        (dq_ref,) = refs
        smem = lambda shape, dt: plgpu.SMEM(shape, dt, transforms=smem_tiles())  # noqa: E731
        table = (lambda shape: smem(shape, cos.dtype)) if rope else (lambda shape: None)
        k_table = table if rotate else (lambda shape: None)
        buffers = (smem((2, 2, bq, half), q.dtype), smem((2, bq, D), do.dtype),
                   table((2, bq, half)), table((2, bq, half)),
                   smem((stages, 2, bk, half), k.dtype), k_table((stages, bk, half)),
                   k_table((stages, bk, half)), smem((stages, bk, D), v.dtype),
                   smem((2, bq, bk), k.dtype) if interp else None,
                   plgpu.SMEM((2, bq), jnp.float32), plgpu.SMEM((2, bq), jnp.float32),
                   plgpu.SMEM((2, bq), jnp.int32) if segs else None,
                   plgpu.SMEM((stages, bk), jnp.int32) if segs else None)
        q_loads = 5 + (2 if rotate else 0) + (1 if segs else 0)  # Q halves, dO, lse, delta (+ cos, sin) (+ ids)
        k_loads = 2 + (2 if rotate else 0) + (1 if segs else 0)  # K halves (+ cos, sin) (+ ids)
        barriers = (plgpu.Barrier(num_arrivals=q_loads, num_barriers=2),
                    plgpu.Barrier(num_arrivals=k_loads, num_barriers=stages),
                    plgpu.Barrier(num_arrivals=1, num_barriers=stages) if rotate else None,
                    plgpu.Barrier(num_arrivals=1, num_barriers=stages),
                    plgpu.Barrier(num_arrivals=2, num_barriers=stages),
                    plgpu.Barrier(num_arrivals=2, num_barriers=2) if rope and not rotate else None,
                    plgpu.Barrier(num_arrivals=2, num_barriers=stages) if early_v else None)
        pl.run_scoped(lambda *scr: kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, cos_ref, sin_ref,
                                          seg_ref, rng_ref, win_ref, dq_ref, scr),
                      buffers, barriers, collective_axes="wg")

    f = plgpu.kernel(
        entry,
        out_type=jax.ShapeDtypeStruct(q.shape, q.dtype),
        grid=tiles.grid, grid_names=tiles.grid_names, num_threads=3, thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=interpret,
    )
    extra = ((cos, sin) if rope else ()) + ((seg, segment_ranges(seg)[0] if ranges is None else ranges) if segs else ())
    extra += (window_array(window),) if windowed else ()
    return f(q, k, v, do, lse, delta, *extra)
