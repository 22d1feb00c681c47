"""dK and dV of causal GQA flash attention with RoPE inside, as a Mosaic GPU kernel (Hopper: wgmma,
TMA, warp specialization). Companion of the forward in attention_mosaic.py; the math is the Triton
`_dkv_kernel`'s of attention.py; `flash_attention`'s dk/dv on sm_90 where `attention_mosaic.supported`.

Per (kv head, 128-key block, batch) CTA, computed transposed (keys x queries) per 64x64 tile:
  S^T = K_rot Q_rot^T, P^T = exp2(S^T scale log2e - lse), dV += P^T dO, dP^T = V dO^T,
  dS^T = P^T (dP^T - delta), dK_rot += dS^T Q_rot
over the G query heads of the group and the query tiles from the diagonal to the end (the diagonal
tile masked). dV and the two dK halves accumulate in wgmma accumulators (fp32, 64x128 per
consumer); P^T and then dS^T go through one shared buffer per consumer (the A operand of the dV /
dK wgmmas). At the end dK is scaled, un-rotated (the transpose of the rotation) and written with
dV through the K / V buffers.

Three warpgroups. Two consumers own 64 key rows each (they TMA-load and
rotate their K once, and V); a producer TMA-loads per step one 64-row query tile (Q halves, cos/sin,
dO, lse, delta rows) into `stages` slots, rotates Q once in shared memory for both consumers and
releases it on a "ready" barrier; dO/lse/delta are waited on directly by the consumers, which hand
each slot back on a "consumed" barrier. Packing (segment ids): each CTA stops after
the last query tile sharing a segment with its keys (`attention_mosaic.segment_ranges`) and
every tile is masked by segment. The consumer of the upper 64 keys has nothing to do on
the first query tile of each head (entirely above its diagonal) and only keeps the barriers' phases
in step there. (The first version, two independent single-buffered warpgroups each loading and
rotating its own query tiles, was removed in session 13: `git show f4132a9`, pipelined=False.)
p_regs=True (compiled only; the default there): P^T / dS^T as register A operands and
the accumulators as loop-carried values (as JAX's attention_mgpu backward does).
Measured on the H200 (2026-12-01, benchmarks/bench_mosaic_bwd.py; B*T = 16k, Hq/Hkv 32/8, RoPE),
T = 2k / 8k: pipelined + p_regs + setmaxnreg (200, 104) 1.98 / 5.95 ms; the same without register
limits 2.73 / 9.14; P^T through shared memory 3.15 / 9.86 (no limits; with (216, 80) it did not
finish within 90 s: hang not diagnosed); the two-warpgroup fallback 2.92 / 9.73.
Shared memory at stages=2 with RoPE: ~214 KB (stages=3 does not fit: 264 KB > 227 KB).
Without RoPE tables (the default path: XLA rotates before the kernels) the producer only issues
copies and the consumers get 240 registers (FA3's split): 1.11-1.14x faster than (200, 104) at
2k / 8k (2026-12-02, benchmarks/RESULTS.md 00000000).

with_dq: the fused backward (dq from the same dS^T tiles, reduce-added; see mosaic_dkv). flash_attention
uses it from T = 16k on (Tuning.mosaic_fused_bwd; attention_NOTES.md sessions 9-18).

Under JAX's Mosaic GPU interpreter (no transposed wgmma operand, no load with a layout), S^T and
dP^T are jnp dots of the shared-memory tiles and lse/delta plain loads (tests/test_attention_mosaic_dkv.py).
"""
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.attention_mosaic import (Values, block_index, check_regs, cta_grid, launch_kernel, rotate_halves,
                                             probs_keys_first, run_consumers, segment_ranges, smem_tiles, soft_cap_grad,
                                             window_array)

HEAD_DIM = 128
BLOCK_K = 128  # key rows per CTA (two warpgroups of 64)
TILE = 64      # key rows per consumer and query rows per step


def mosaic_dkv(q, k, v, do, lse, delta, cos=None, sin=None, seg=None, *, ranges=None, scale, stages=2,
               regs="auto", p_regs=None, longest_first=True, with_dq=False,
               ds_under_dv=None, static_consumers=True, rows_early=False, no_auto_barriers=False, pre_rotated=False,
               window=None, softcap=None, interpret=None):
    """q/do [B, T, Hq, D], k/v [B, T, Hkv, D] (D = 128, T % 128 == 0, 16-bit); lse/delta [B, Hq, T]
    float32 (lse: log2-sum-exp2 over the visible keys of scale*log2(e)*q_rot.k_rot; delta =
    rowsum(dO*O)); cos/sin [B|1, T, D/2] float16 or None (no RoPE); seg [B, T] int32 segment ids
    or None (ranges: segment_ranges(seg)[1] if already computed). Returns dk, dv (k's shape and dtype), dk the gradient w.r.t. the
    un-rotated k.

    stages: query-tile slots in flight. regs: (consumer, producer) registers per thread
    for setmaxnreg (2*128*c + 128*p <= 65536) or None; "auto": (240, 24) without RoPE tables (the
    producer then only issues copies; FA3's split), (200, 104) with them (the producer rotates Q). p_regs (compiled only): P^T /
    dS^T as register A operands of the dV / dK wgmmas instead of through shared memory; None = when
    compiled (the interpreter cannot run it). longest_first: launch order (attention_mosaic.cta_grid;
    causal: the first key blocks see the most queries).

    with_dq (no RoPE tables): also dq (q's shape and dtype), from the same dS^T tiles
    (the fused backward: 5 GEMMs per tile pair instead of the 7 of this kernel and
    attention_mosaic_dq together). Per step both consumers put dS^T in shared memory; each then
    computes one half of D of the tile's dQ = dS K over all 128 keys and reduce-adds it (fp32, TMA)
    into a zeroed accumulator that every key block of the row adds to. The interpreter has no
    reduce-add: there every key block stores its partial in its own slice of a zeroed
    [T/128, B, T, Hq, D] output and XLA sums them. (Each consumer reduce-adding its own keys' dQ
    over all of D instead, with no meeting per step and twice the reduce-add bytes, measured 0.66x /
    0.70x at 2k / 8k: `git show f4132a9:pallas_kernels/attention_mosaic_dkv.py`, dq_tiles="own_keys".)

    ds_under_dv (p_regs): issue dP^T before dV and wait for dP^T only, so dS^T
    is computed while the dV wgmma runs (tokamax's order; the other waits for both). None = where
    measured: p_regs without RoPE tables (H200, same process: 1.01x / 1.07x at 2k / 8k, fused
    1.06x / 1.07x; RESULTS.md 0000000000). The interpreter cannot run it (p_regs).

    static_consumers: each consumer warpgroup runs its own copy of the consumer code with its buffer
    index a constant, so every wgmma descriptor of its buffers is an immediate; otherwise (False)
    they depend on the warpgroup index, are computed once and held in registers, which the fused
    kernel spilled: ~16% of its warps' stall samples were R2URs waiting on those reloads (ncu, 8k).
    On the H200, kernels alone (2026-12-04, RESULTS.md session 18): dk/dv 1.016x / 1.029x / 1.007x
    at 2k / 8k / 32k, fused 1.09x / 1.11x / 1.09x (its 32k backward 47.2 -> 42.1 ms).

    rows_early (p_regs): each step loads its lse and delta rows from shared memory before issuing
    S^T, instead of right after the wgmma whose result they meet (in the fused kernel at 8k ~18% of
    a consumer's stall samples waited on those loads or on the lane index their addresses need,
    session 19); costs their registers across the S^T wgmmas. Fwd+bwd on the H100 (session 22):
    the separate kernel 2-6% faster at 8k, the fused one 3-13% slower (flash_attention's default
    follows: Tuning.mosaic_dkv_rows_early).

    Tried and removed in session 23 (code at 7d53fe3; attention_NOTES.md sessions 19-23): dq_lag (each
    tile's dQ a step late, 1.16x slower), dq_behind_dk (the dQ wgmmas inside the dK run_state, level),
    dq_atomic (dQ added from registers by `red`, 2x slower), static_slots (two steps a loop iteration,
    slots as constants, 1.3-1.9x slower).

    no_auto_barriers (applies without in-kernel rotation): Pallas' warpgroup barriers before and
    after every shared-memory store (CompilerParams.unsafe_no_auto_barriers) left out. The fused
    kernel stores two tiles a step (dS^T for dQ, the fp32 dQ staging tile): 7 warpgroup barriers a
    step with them, 3 without (the stores' commits and the wait for the last reduce-add's read
    keep theirs); ~7% of a consumer's stall samples sat on those stores (session 19). Safe here
    because no thread reads shared memory another thread wrote except through wgmma / TMA after a
    commit, and every overwrite of a buffer an async read used waits for it first (wgmma waits,
    the meetings, wait_smem_to_gmem's own barrier); the in-kernel rotation reads and rewrites
    tiles, so it keeps them. Fused, fwd+bwd on the H100 (session 23): 16k 1.010x against 1.043x
    cuDNN's time, 32k 1.013x against 1.040x (flash_attention's fused default:
    Tuning.mosaic_fused_no_auto_barriers).

    pre_rotated: q and k come rotated (by XLA); cos/sin then only un-rotate dK on its
    way out (the keys' tables, loaded with K on a barrier only the epilogue waits for; no query
    tables, no rotation in shared memory), which saves XLA's separate un-rotation pass over dk. The
    launch defaults are those without tables. Measured 0.963x / 0.977x of the kernel without
    tables at 2k / 8k (RESULTS.md 000000000000); Tuning.rope_grad_in_kernel turns it on.

    window: a sliding window W (query i sees key j iff i - j < W) or None: each CTA stops after the
    query tile of its last key's last visible query, and every tile is masked by it. softcap: c or
    None, as attention_mosaic.mosaic_forward's (dS^T then carries the cap's factor 1 - tanh^2)."""
    B, T, Hq, D = q.shape
    Hkv = k.shape[2]
    G = Hq // Hkv
    half, t = D // 2, TILE
    assert D == HEAD_DIM and T % BLOCK_K == 0 and Hq % Hkv == 0, (q.shape, k.shape)
    rope = cos is not None
    rotate = rope and not pre_rotated  # the kernel rotates Q and K tiles (else only un-rotates dK)
    segs = seg is not None
    windowed = window is not None
    table_b = cos.shape[0] if rope else 1
    interp = interpret is not None
    nq = T // t
    if regs == "auto":
        regs = (200, 104) if rotate else (240, 24)
    check_regs(regs)
    use_regs = regs is not None and not interp
    if p_regs is None:
        p_regs = not interp
    assert not (p_regs and interp), "p_regs: the compiled kernel only"
    assert not with_dq or not rope, "with_dq: the kernel without tables"
    if ds_under_dv is None:
        ds_under_dv = p_regs and not rotate
    assert not ds_under_dv or p_regs, "ds_under_dv: p_regs"
    # dS^T buffers per consumer (with_dq: the consumers read each other's), by step: two (the
    # other consumer may still read step j - 1's)
    ds_bufs = 2 if with_dq else 1
    n_kb = T // BLOCK_K
    val = Values(interp)
    vec = val.vec  # dim 0: along the keys (rows), 1: the queries (columns) of a [keys, queries] tile

    def col_vec(ref):
        return vec(ref, 1)

    def probs_t(my_k, q_parts, lse_of, k0, q0, masked, seg_t=None, w_size=None):
        """P^T [keys, queries] of one 64x64 tile, float32, and the softcap's tanh (or None). lse_of():
        the lse row (a value along the columns); seg_t: (key ids [t] value, query ids ref)."""
        if interp:  # no transposed wgmma operand in the interpreter
            s_t = sum(lax.dot_general(my_k.at[p][...], q_parts.at[p][...], (((1,), (1,)), ((), ())),
                                      preferred_element_type=jnp.float32) for p in range(2))
        else:
            def qk(acc):
                for p in range(2):
                    plgpu.wgmma(acc, my_k.at[p], plgpu.transpose_ref(q_parts.at[p], (1, 0)))
                plgpu.wgmma_wait(0)
                return acc[...]
            s_t = pl.run_scoped(qk, plgpu.ACC((t, t), jnp.float32))
        return probs_keys_first(s_t, lse_of, val, k0, q0, scale=scale, masked=masked, softcap=softcap,
                                window=w_size, seg=seg_t)

    def tile_math(accs, my_k, my_v, my_p, q_parts, do_t, lse_t, delta_t, k0, q0, masked, seg_t=None, w_size=None):
        """One 64x64 (keys x queries) tile: dV += P^T dO, dK_rot (halves) += dS^T Q_rot, with P^T
        and dS^T through shared memory. Returns after every wgmma reading q_parts / do_t / my_p
        completed."""
        dv_acc, dk_accs = accs
        p_t, tanh = probs_t(my_k, q_parts, lambda: col_vec(lse_t), k0, q0, masked, seg_t, w_size)
        my_p[...] = p_t.astype(my_p.dtype)
        plgpu.commit_smem()  # generic-proxy writes of P^T -> visible to wgmma
        plgpu.wgmma(dv_acc, my_p, do_t)
        if interp:
            dp_t = lax.dot_general(my_v[...], do_t[...], (((1,), (1,)), ((), ())),
                                   preferred_element_type=jnp.float32)
        else:
            def vdo(acc):
                plgpu.wgmma(acc, my_v, plgpu.transpose_ref(do_t, (1, 0)))
                plgpu.wgmma_wait(0)  # the dV wgmma too: P^T's buffer is overwritten next
                return acc[...]
            dp_t = pl.run_scoped(vdo, plgpu.ACC((t, t), jnp.float32))
        plgpu.wgmma_wait(0)
        ds_t = soft_cap_grad(p_t * (dp_t - lax.broadcast_in_dim(col_vec(delta_t), (t, t), [1])), tanh)
        my_p[...] = ds_t.astype(my_p.dtype)
        plgpu.commit_smem()
        for p in range(2):
            plgpu.wgmma(dk_accs[p], my_p, q_parts.at[p])
        plgpu.wgmma_wait(0)

    def tile_math_regs(accs, my_k, my_v, q_parts, do_t, lse_t, delta_t, k0, q0, masked, seg_t=None, ds_out=None,
                       w_size=None):
        """tile_math with P^T and dS^T as register A operands and the accumulators as values
        (compiled path only: the interpreter has no register A operand nor run_state); dS^T also
        into the shared-memory tile ds_out if given (the fused backward's dQ reads it)."""

        def store_ds(ds_t):
            if ds_out is not None:
                ds_out[...] = ds_t
                plgpu.commit_smem()

        def row_of(ref):  # the row vector: loaded here (rows_early) or where it is first used
            if rows_early:
                v = col_vec(ref)
                return lambda: v
            return lambda: col_vec(ref)

        dv, dk0, dk1 = accs
        lse_of, delta_of = row_of(lse_t), row_of(delta_t)
        p_t, tanh = probs_t(my_k, q_parts, lse_of, k0, q0, masked, seg_t, w_size)
        zeros = plgpu.layout_cast(jnp.zeros((t, t), jnp.float32), plgpu.Layout.WGMMA)
        if ds_under_dv:  # one run_state: dV stays in flight while dS^T is computed
            def step(refs):
                dv_ref, dp_ref, dk_refs = refs
                plgpu.wgmma(dp_ref, my_v, plgpu.transpose_ref(do_t, (1, 0)))
                plgpu.wgmma(dv_ref, p_t.astype(q.dtype), do_t)
                dp_t = plgpu.wgmma_accumulator_load(dp_ref, wait_n=1)  # dP^T done, dV may run on
                ds_t = soft_cap_grad(p_t * (dp_t - lax.broadcast_in_dim(delta_of(), (t, t), [1])), tanh).astype(q.dtype)
                for p in range(2):
                    plgpu.wgmma(dk_refs[p], ds_t, q_parts.at[p])
                store_ds(ds_t)
            dv, _, (dk0, dk1) = pl.run_state(step)(
                (plgpu.ACC.init(dv), plgpu.ACC.init(zeros), (plgpu.ACC.init(dk0), plgpu.ACC.init(dk1))))
            return dv, dk0, dk1

        def dv_dp(refs):
            dv_ref, dp_ref = refs
            plgpu.wgmma(dv_ref, p_t.astype(q.dtype), do_t)
            plgpu.wgmma(dp_ref, my_v, plgpu.transpose_ref(do_t, (1, 0)))
        dv, dp_t = pl.run_state(dv_dp)((plgpu.ACC.init(dv), plgpu.ACC.init(zeros)))
        ds_t = soft_cap_grad(p_t * (dp_t - lax.broadcast_in_dim(delta_of(), (t, t), [1])), tanh).astype(q.dtype)

        def dk(refs):
            for p in range(2):
                plgpu.wgmma(refs[p], ds_t, q_parts.at[p])
        dk0, dk1 = pl.run_state(dk)((plgpu.ACC.init(dk0), plgpu.ACC.init(dk1)))
        store_ds(ds_t)
        return dv, dk0, dk1

    def load_k(k_ref, v_ref, cos_ref, sin_ref, b, tb, kvh, keys, my_k, my_v, my_c, my_s, bar,
               seg_ref=None, my_seg=None, table_bar=None):
        """K halves, V (+ ids) (+ cos/sin: on table_bar if given, for the epilogue to wait for)."""
        for part in range(2):
            plgpu.copy_gmem_to_smem(k_ref.at[b, keys, kvh, pl.ds(part * half, half)], my_k.at[part], bar)
        plgpu.copy_gmem_to_smem(v_ref.at[b, keys, kvh], my_v, bar)
        if rope:
            plgpu.copy_gmem_to_smem(cos_ref.at[tb, keys], my_c, table_bar or bar)
            plgpu.copy_gmem_to_smem(sin_ref.at[tb, keys], my_s, table_bar or bar)
        if seg_ref is not None:
            plgpu.copy_gmem_to_smem(seg_ref.at[b, keys], my_seg, bar)
        plgpu.barrier_wait(bar)
        if rotate:
            rotate_halves(my_k, my_c, my_s, t, t)
        plgpu.commit_smem()

    def accumulate(loop):
        """Runs loop(accs) with fresh dV / dK-halves accumulators; returns their values."""
        def body(dv_acc, dk0, dk1):
            loop((dv_acc, (dk0, dk1)))
            return dv_acc[...], dk0[...], dk1[...]
        return pl.run_scoped(body, plgpu.ACC((t, D), jnp.float32), plgpu.ACC((t, half), jnp.float32),
                             plgpu.ACC((t, half), jnp.float32))

    def finish(dv, dk0, dk1, my_k, my_v, my_c, my_s, dk_ref, dv_ref, b, keys, kvh, table_loads):
        """Scale and un-rotate dK (cos/sin of the keys in my_c / my_s after table_loads()), write
        dK, dV through the K / V buffers."""
        dk0, dk1 = dk0 * scale, dk1 * scale
        if rope:  # gradient w.r.t. the un-rotated k: the transpose of the rotation
            table_loads()
            c = my_c[...].astype(jnp.float32)
            s = my_s[...].astype(jnp.float32)
            dk0, dk1 = dk0 * c + dk1 * s, dk1 * c - dk0 * s
        my_k.at[0][...] = dk0.astype(my_k.dtype)
        my_k.at[1][...] = dk1.astype(my_k.dtype)
        my_v[...] = dv.astype(my_v.dtype)
        plgpu.commit_smem()
        for part in range(2):
            plgpu.copy_smem_to_gmem(my_k.at[part], dk_ref.at[b, keys, kvh, pl.ds(part * half, half)])
        plgpu.copy_smem_to_gmem(my_v, dv_ref.at[b, keys, kvh])
        plgpu.wait_smem_to_gmem(0)

    # ------------------------------------------------------------------ pipelined (producer + 2 consumers)
    def pipe_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, cos_ref, sin_ref, seg_ref, rng_ref, win_ref,
                    dk_ref, dv_ref, dq_ref, scratch):
        (qh, cq, sq, dos, lses, deltas, kh, vs, ck, sk, ps, segk, segq, dqs), \
            (qraw, qready, dbar, consumed, kbar, ds_ready, tbar) = scratch
        kvh, b = lax.axis_index("h"), lax.axis_index("b")
        kb = block_index("k", T // BLOCK_K, longest_first, heavy_last=False)
        wg = lax.axis_index("wg")
        tb = b if table_b > 1 else 0
        i0 = kb * (BLOCK_K // t)       # first query tile of every head (the lower consumer's diagonal)
        i_end = rng_ref[b, kb, 1] if segs else nq  # past the last query tile sharing a segment
        w_size = win_ref[0] if windowed else None
        if windowed:  # ... and past the tile of the last query the block's last key is visible to
            i_end = jnp.minimum(i_end, lax.div(kb * BLOCK_K + BLOCK_K - 1 + w_size - 1, jnp.int32(t)) + 1)
        per_head = i_end - i0          # query tiles per head (>= 2: each key sees itself)
        n_steps = G * per_head

        def tile_of(j, g=None):  # step -> (query head, query tile); g: the step's head in the group, if known
            if g is not None:  # the consumers know it from their head loop: no integer division
                return kvh * G + g, i0 + (j - g * per_head)
            return kvh * G + lax.div(j, jnp.int32(per_head)), i0 + lax.rem(j, jnp.int32(per_head))

        def consumer(wg):  # wg: this consumer's index (0 or 1)
            k0 = kb * BLOCK_K + wg * t
            keys = pl.ds(k0, t)
            my_k, my_v = kh.at[wg], vs.at[wg]
            my_c, my_s = (ck.at[wg], sk.at[wg]) if rope else (None, None)
            load_k(k_ref, v_ref, cos_ref, sin_ref, b, tb, kvh, keys, my_k, my_v, my_c, my_s, kbar.at[wg],
                   seg_ref, segk.at[wg] if segs else None, table_bar=tbar.at[wg] if tbar is not None else None)
            key_ids = vec(segk.at[wg], 0) if segs else None

            def slot_of(j):  # step j's query-tile slot
                return lax.rem(j, jnp.int32(stages))

            def ds_slot(j):  # with_dq: by step (the other consumer may still read step j - 1's)
                return lax.rem(j, jnp.int32(ds_bufs))

            def p_buf(j):
                return ps.at[ds_slot(j), wg]

            def rest_of_head(j0, run, carry):
                """run(carry, j) over steps j0 + 2 .. j0 + per_head - 1 of a head."""
                return lax.fori_loop(j0 + 2, j0 + per_head, lambda j, c: run(c, j), carry)

            def seg_of(slot):
                return (key_ids, segq.at[slot]) if segs else None

            def ds_times_k(pairs):
                """sum of dS_w K_w over (dS^T tile, K part) pairs: a [queries, D/2] float32 value."""
                if interp:  # no transposed wgmma operand in the interpreter
                    return sum(lax.dot_general(d[...], k_[...], (((0,), (0,)), ((), ())),
                                               preferred_element_type=jnp.float32) for d, k_ in pairs)

                def mm(acc):
                    for d, k_ in pairs:
                        plgpu.wgmma(acc, plgpu.transpose_ref(d, (1, 0)), k_)
                    plgpu.wgmma_wait(0)
                    return acc[...]
                return pl.run_scoped(mm, plgpu.ACC((t, half), jnp.float32))

            def add_dq(acc, i, h):
                """Reduce-add acc into dQ[rows of tile i, head h, my half of D] through my staging
                tile (once the last reduce-add from it read it); interpreted: into this key block's
                partials slice."""
                rows, cols = pl.ds(i * t, t), pl.ds(wg * half, half)
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)
                stage = dqs.at[wg]
                stage[...] = acc
                plgpu.commit_smem()
                if interp:
                    plgpu.copy_smem_to_gmem(stage, dq_ref.at[kb, b, rows, h, cols])
                else:
                    plgpu.copy_smem_to_gmem(stage, dq_ref.at[b, rows, h, cols], reduction_op="add")

            def dq_tile(j, g):
                """The dQ work of step j (of head g in the group), once my dS^T of tile j is written:
                meet the other consumer, then tile j's dQ[:, my half of D] over both consumers' keys
                (their two dS^T tiles of step j times K_rot's half), reduce-added. Writing step j's
                dS^T was safe: the other consumer arrived at step j - 1's meeting after reading step
                j - 2's tiles."""
                meet_other_consumer()
                h, i = tile_of(j, g)
                ds_tiles = ps.at[ds_slot(j)]
                add_dq(ds_times_k([(ds_tiles.at[w], kh.at[w, wg]) for w in range(2)]), i, h)

            def meet_other_consumer():
                """with_dq: both consumers meet, after each step's dS^T (each reads the other's) and
                after the last step (each reads the other's K, which finish overwrites)."""
                plgpu.barrier_arrive(ds_ready)
                plgpu.barrier_wait(ds_ready)

            def step(accs, j, masked, g):
                slot = slot_of(j)
                _, i = tile_of(j, g)
                plgpu.barrier_wait(qready.at[slot])
                plgpu.barrier_wait(dbar.at[slot])
                tile_math(accs, my_k, my_v, p_buf(j), qh.at[slot], dos.at[slot], lses.at[slot],
                          deltas.at[slot], k0, i * t, masked, seg_of(slot), w_size)
                if with_dq:
                    dq_tile(j, g)
                plgpu.barrier_arrive(consumed.at[slot])

            def skip(j):  # a tile above this consumer's diagonal: keep the barriers' phases in step
                slot = slot_of(j)
                plgpu.barrier_wait(qready.at[slot])
                plgpu.barrier_wait(dbar.at[slot])
                plgpu.barrier_arrive(consumed.at[slot])

            def loop(accs):
                def head(g, _):
                    j0 = g * per_head
                    if with_dq:  # both consumers take part in every dQ tile (the upper one's P = 0)
                        step(accs, j0, True, g)
                        step(accs, j0 + 1, True, g)
                    else:
                        @pl.when(wg == 0)
                        def _():
                            step(accs, j0, True, g)
                            step(accs, j0 + 1, False, g)

                        @pl.when(wg == 1)
                        def _():
                            skip(j0)
                            step(accs, j0 + 1, True, g)
                    rest_of_head(j0, lambda c, j: step(accs, j, False, g), None)
                lax.fori_loop(0, G, head, None)

            def step_regs(accs, j, masked, g):
                slot = slot_of(j)
                _, i = tile_of(j, g)
                plgpu.barrier_wait(qready.at[slot])
                plgpu.barrier_wait(dbar.at[slot])
                accs = tile_math_regs(accs, my_k, my_v, qh.at[slot], dos.at[slot], lses.at[slot], deltas.at[slot],
                                      k0, i * t, masked, seg_of(slot), ds_out=p_buf(j) if with_dq else None,
                                      w_size=w_size)
                if with_dq:
                    dq_tile(j, g)
                plgpu.barrier_arrive(consumed.at[slot])
                return accs

            def head_regs(g, accs):  # no pl.when with values: both consumers run the first two
                j0 = g * per_head    # tiles masked (the upper one's first is all masked: P = 0)
                accs = step_regs(accs, j0, True, g)
                accs = step_regs(accs, j0 + 1, True, g)
                return rest_of_head(j0, lambda c, j: step_regs(c, j, False, g), accs)

            if p_regs:
                wg_zeros = lambda n: plgpu.layout_cast(jnp.zeros((t, n), jnp.float32), plgpu.Layout.WGMMA)  # noqa: E731
                dv, dk0, dk1 = lax.fori_loop(0, G, head_regs, (wg_zeros(D), wg_zeros(half), wg_zeros(half)))
            else:
                dv, dk0, dk1 = accumulate(loop)
            if with_dq:  # the other consumer is done with my K (finish reuses the buffer)
                meet_other_consumer()
            def keys_tables():  # pre-rotated: they came on their own barrier, waited for only here
                if tbar is not None:
                    plgpu.barrier_wait(tbar.at[wg])
            finish(dv, dk0, dk1, my_k, my_v, my_c, my_s, dk_ref, dv_ref, b, keys, kvh, keys_tables)

        @pl.when(wg < 2)
        def _consumer():
            if use_regs:
                plgpu.set_max_registers(regs[0], action="increase")
            run_consumers(wg, consumer, static_consumers)

        @pl.when(wg == 2)
        def _producer():
            if use_regs:
                plgpu.set_max_registers(regs[1], action="decrease")

            def issue(j, slot):
                h, i = tile_of(j)
                rows = pl.ds(i * t, t)
                for part in range(2):
                    plgpu.copy_gmem_to_smem(q_ref.at[b, rows, h, pl.ds(part * half, half)], qh.at[slot, part], qraw.at[slot])
                if rotate:
                    plgpu.copy_gmem_to_smem(cos_ref.at[tb, rows], cq.at[slot], qraw.at[slot])
                    plgpu.copy_gmem_to_smem(sin_ref.at[tb, rows], sq.at[slot], qraw.at[slot])
                plgpu.copy_gmem_to_smem(do_ref.at[b, rows, h], dos.at[slot], dbar.at[slot])
                plgpu.copy_gmem_to_smem(lse_ref.at[b, h, rows], lses.at[slot], dbar.at[slot])
                plgpu.copy_gmem_to_smem(delta_ref.at[b, h, rows], deltas.at[slot], dbar.at[slot])
                if segs:
                    plgpu.copy_gmem_to_smem(seg_ref.at[b, rows], segq.at[slot], dbar.at[slot])

            for s_ in range(stages):  # n_steps >= 2 * G >= 2
                @pl.when(s_ < n_steps)
                def _():
                    issue(s_, s_)

            def body(j, _):
                slot = lax.rem(j, jnp.int32(stages))
                plgpu.barrier_wait(qraw.at[slot])
                if rotate:
                    rotate_halves(qh.at[slot], cq.at[slot], sq.at[slot], t, t)
                    plgpu.commit_smem()  # fence.proxy.async + warpgroup barrier before the release
                plgpu.barrier_arrive(qready.at[slot])
                refill = j - 1 + stages  # the step that goes where step j - 1 was

                @pl.when((j >= 1) & (refill < n_steps))
                def _():
                    prev = lax.rem(j - 1, jnp.int32(stages))
                    plgpu.barrier_wait(consumed.at[prev])
                    issue(refill, prev)
            lax.fori_loop(0, n_steps, body, None)

            def drain(j, _):  # the last steps' slots are not refilled: observe their release anyway
                plgpu.barrier_wait(consumed.at[lax.rem(j, jnp.int32(stages))])
            lax.fori_loop(jnp.maximum(n_steps - stages, 0), n_steps, drain, None)

    def entry(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs):
        refs = list(refs)
        cos_ref, sin_ref = (refs.pop(0), refs.pop(0)) if rope else (None, None)
        seg_ref, rng_ref = (refs.pop(0), refs.pop(0)) if segs else (None, None)
        win_ref = refs.pop(0) if windowed else None
        dq_ref = None
        if with_dq:  # compiled: the accumulator is an argument (before the outputs); interpreted, an output
            dq_ref = refs.pop(-1 if interp else 0)
        dk_ref, dv_ref = refs
        smem = lambda shape, dt: plgpu.SMEM(shape, dt, transforms=smem_tiles())  # noqa: E731
        table = (lambda n: smem((n, t, half), cos.dtype)) if rope else (lambda n: None)
        q_table = table if rotate else (lambda n: None)
        k_loads = 3 + (2 if rotate else 0) + (1 if segs else 0)  # K halves, V (+ cos, sin) (+ ids)
        kv_bufs = (smem((2, 2, t, half), k.dtype), smem((2, t, D), v.dtype))
        p_buf = smem((ds_bufs, 2, t, t), q.dtype)  # [step's buffer, consumer]
        dq_stage = plgpu.SMEM((2, t, half), jnp.float32,  # 128-byte swizzle: 32 floats a row
                              transforms=(plgpu.TilingTransform((8, 32)), plgpu.SwizzleTransform(128)))
        buffers = (smem((stages, 2, t, half), q.dtype), q_table(stages), q_table(stages),
                   smem((stages, t, D), do.dtype), plgpu.SMEM((stages, t), jnp.float32),
                   plgpu.SMEM((stages, t), jnp.float32), *kv_bufs, table(2), table(2), p_buf,
                   plgpu.SMEM((2, t), jnp.int32) if segs else None,
                   plgpu.SMEM((stages, t), jnp.int32) if segs else None,
                   dq_stage if with_dq else None)
        barriers = (plgpu.Barrier(num_arrivals=2 + (2 if rotate else 0), num_barriers=stages),
                    plgpu.Barrier(num_arrivals=1, num_barriers=stages),
                    plgpu.Barrier(num_arrivals=3 + (1 if segs else 0), num_barriers=stages),
                    plgpu.Barrier(num_arrivals=2, num_barriers=stages),
                    plgpu.Barrier(num_arrivals=k_loads, num_barriers=2),
                    plgpu.Barrier(num_arrivals=2, num_barriers=1) if with_dq else None,  # both consumers' dS^T
                    plgpu.Barrier(num_arrivals=2, num_barriers=2) if rope and not rotate else None)  # keys' tables
        pl.run_scoped(lambda *scr: pipe_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, cos_ref, sin_ref,
                                        seg_ref, rng_ref, win_ref, dk_ref, dv_ref, dq_ref, scr),
                      buffers, barriers, collective_axes="wg")

    grid, grid_names = cta_grid(Hkv, T // BLOCK_K, B, "k", longest_first)
    out_type = [jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)]
    extra = ((cos, sin) if rope else ()) + ((seg, segment_ranges(seg)[1] if ranges is None else ranges) if segs else ())
    extra += (window_array(window),) if windowed else ()
    launch = functools.partial(
        launch_kernel, entry, grid=grid, grid_names=grid_names, num_threads=3,
        thread_name="wg", interpret=interpret,
        compiler_params=plgpu.CompilerParams(approx_math=True, unsafe_no_auto_barriers=no_auto_barriers and not rotate))
    if not with_dq:
        return launch(out_type)(q, k, v, do, lse, delta, *extra)
    if interp:  # per key block partials in a zeroed output (the interpreter has no reduce-add)
        out_type.append(jax.ShapeDtypeStruct((n_kb, *q.shape), jnp.float32))
        dk, dv, parts = launch(out_type, zero_outputs=True)(q, k, v, do, lse, delta, *extra)
        dq = parts.sum(0)
    else:
        acc = jax.new_ref(jnp.zeros(q.shape, jnp.float32))
        dk, dv = launch(out_type)(q, k, v, do, lse, delta, *extra, acc)
        dq = acc[...]
    return dk, dv, (dq * scale).astype(q.dtype)
