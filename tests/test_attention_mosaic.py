"""The Mosaic GPU attention forward (pallas_kernels/attention_mosaic.py) under JAX's Mosaic GPU
interpreter on the CPU, against the jnp reference; and its wiring into flash_attention, checked by
lowering for CUDA on the CPU (no GPU needed)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mosaic_cases import barrier_callers, inputs, interpret_params, packed_segments, races_found, reference_lse, rope_tables
from pallas_kernels import attention as attn
from pallas_kernels import attention_mosaic as M
from pallas_kernels.attention import flash_attention_reference


def _inputs(B, T, Hq, Hkv, seed):
    q, k, v, _, inv_freq = inputs(B, T, Hq, Hkv, seed)
    return q, k, v, inv_freq


@pytest.mark.parametrize("synchronized", [True, False])
def test_interpreter_race_detector_sees_an_unsynchronized_handoff(synchronized):
    """The race check of every interpreter test here can fail: one warpgroup writes shared memory,
    another copies it out, with or without the barrier between them."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    def body(x_ref, o_ref, buf, ready):
        wg = jax.lax.axis_index("wg")

        @pl.when(wg == 0)
        def _():
            buf[...] = x_ref[...] * 2.0
            if synchronized:
                plgpu.commit_smem()
                plgpu.barrier_arrive(ready)

        @pl.when(wg == 1)
        def _():
            if synchronized:
                plgpu.barrier_wait(ready)
            o_ref[...] = buf[...]

    def entry(x_ref, o_ref):
        pl.run_scoped(lambda *scratch: body(x_ref, o_ref, *scratch), plgpu.SMEM((64, 128), jnp.float32),
                      plgpu.Barrier(num_arrivals=1), collective_axes="wg")
    f = plgpu.kernel(entry, out_type=jax.ShapeDtypeStruct((64, 128), jnp.float32), num_threads=2,
                     thread_name="wg", interpret=interpret_params())
    jax.block_until_ready(f(jnp.ones((64, 128), jnp.float32)))
    assert races_found() == (not synchronized)


def test_segment_block_ranges_match_a_brute_force_count():
    """Exact for contiguous segments (padding 0 at the end included); for ids that repeat apart,
    every visible block pair is still inside the range."""
    runs = np.repeat(np.array([[1, 1, 2, 3, 3, 3, 3, 0]]), 32, axis=1)  # T = 256
    apart = np.repeat(np.array([[5, 2, 2, 5, 7, 2, 7, 7]]), 32, axis=1)
    seg = jnp.asarray(np.concatenate([runs, np.asarray(packed_segments(1, 256, seed=5)), apart]))
    vis = jnp.tril(jnp.ones((256, 256), bool))[None] & (seg[:, :, None] == seg[:, None, :])
    for rows, cols, by_key in [(128, 64, False), (128, 64, True), (64, 64, False)]:
        got = np.asarray(M.segment_block_ranges(seg, rows, cols, by_key=by_key))
        v = vis.transpose(0, 2, 1) if by_key else vis  # [B, blocks of rows, blocks of cols]
        v = np.asarray(v.reshape(3, 256 // rows, rows, 256 // cols, cols).any(axis=(2, 4)))
        for b in range(3):
            for i in range(256 // rows):
                idx = np.nonzero(v[b, i])[0]
                lo, hi = got[b, i]
                if b < 2:
                    assert (lo, hi) == (idx.min(), idx.max() + 1), (rows, by_key, b, i)
                else:
                    assert lo <= idx.min() and idx.max() < hi, (rows, by_key, b, i)


@pytest.mark.parametrize("B,T,Hq,Hkv,rope,segments,longest_first,ctas", [
    # shapes as small as each case allows: these interpreter runs are most of the suite's time
    (1, 128, 4, 2, True, False, True, None), (2, 128, 2, 2, False, False, False, None),
    (2, 128, 2, 1, True, True, True, None),
    # persistent: 8 tiles on 3 CTAs (3, 3, 2 tiles: the partial last round); 4 on 3 with tables
    (2, 256, 2, 1, False, True, True, 3), (1, 128, 4, 2, True, False, True, 3),
    (2, 256, 2, 1, False, True, True, (3, 128, False, False)),  # 128-key tiles, the scale multiplied before the max
    (1, 256, 2, 2, False, False, True, (None, 128)),  # (the others: folded into the exp2, the default)
    (2, 256, 2, 1, False, True, True, (3, 128, True)),  # and ping-pong consumers
    # early_qk (the next QK^T issued behind each PV): packed, persistent, 128 keys; 64 keys (the
    # lower rows' consumer one step short); RoPE tables
    (2, 256, 2, 1, False, True, True, (3, 128, False, True, True)),
    (1, 256, 2, 2, False, False, False, (None, 64, False, True, True)),
    (1, 128, 4, 2, True, False, True, (3, 64, False, True, True)),
    (2, 256, 4, 2, False, False, True, (3, 128, False, True, True, 2)),  # the tile order by chunks of 2 heads
    (2, 256, 4, 2, False, True, True, (3, 128, False, True, True, 2, "list")),  # ... as a list schedule, packed
    (1, 256, 2, 1, False, True, True, (3, 128, False, True, True, None, "snake", 100, 1.0))])  # window, softcap, packed
def test_mosaic_forward_matches_reference_in_the_interpreter(B, T, Hq, Hkv, rope, segments, longest_first, ctas):
    defaults = (None, M.BLOCK_K, False, True, False, None, "snake", None, None)
    ctas = ctas + defaults[len(ctas):] if isinstance(ctas, tuple) else (ctas, *defaults[1:])
    ctas, key_block, pingpong, fold_scale, early_qk, head_chunk, schedule, window, softcap = ctas
    q, k, v, inv_freq = _inputs(B, T, Hq, Hkv, seed=T + Hq)
    seg = packed_segments(B, T, seed=T) if segments else None
    inv_freq = inv_freq if rope else None
    scale = M.HEAD_DIM ** -0.5
    tables = rope_tables(T, inv_freq) if rope else ()
    stages = 3 if rope and early_qk else 2  # (early_qk with tables needs 3)
    o, lse = M.mosaic_forward(q, k, v, *tables, seg=seg, scale=scale, stages=stages, longest_first=longest_first,
                              ctas=ctas, key_block=key_block, pingpong=pingpong, fold_scale=fold_scale,
                              early_qk=early_qk, head_chunk=head_chunk, schedule=schedule, window=window, softcap=softcap,
                              interpret=interpret_params())
    ref = flash_attention_reference(q, k, v, inv_freq=inv_freq, segment_ids=seg, sliding_window=window,
                                    logit_softcap=softcap)
    err = float(jnp.max(jnp.abs(o.astype(jnp.float32) - ref.astype(jnp.float32))) / jnp.max(jnp.abs(ref.astype(jnp.float32))))
    assert o.shape == q.shape and o.dtype == q.dtype
    assert not races_found()
    assert err < 2e-2
    np.testing.assert_allclose(np.asarray(lse), np.asarray(reference_lse(q, k, inv_freq, scale, seg, window, softcap)), atol=3e-2)


@pytest.mark.parametrize("batch,heads,blocks,ctas,head_chunk", [
    (2, 8, 5, 7, None), (2, 8, 5, 7, 4), (1, 8, 3, 4, 8), (3, 4, 2, 5, 2)])
def test_persistent_tiles_cover_every_tile_once_in_order(batch, heads, blocks, ctas, head_chunk):
    """QTiles: each (query block, batch row, head) goes to exactly one CTA; in the global order
    (round by round) the query blocks run longest first, within each chunk of heads if chunked."""
    tiles = M.QTiles(batch, heads, blocks, ctas, True, head_chunk)
    rounds = -(-batch * heads * blocks // ctas)

    def per_cta(_):
        n = tiles.count()
        return n, jnp.stack([jnp.stack(tiles.coords(jnp.int32(i))) for i in range(rounds)])
    counts, coords = jax.vmap(per_cta, axis_name="cta")(jnp.arange(ctas))
    counts, coords = np.asarray(counts), np.asarray(coords)  # [ctas], [ctas, rounds, (qi, b, h)]
    got = [tuple(coords[c, i]) for c in range(ctas) for i in range(counts[c])]
    want = [(qi, b, h) for qi in range(blocks) for b in range(batch) for h in range(heads)]
    assert sorted(got) == sorted(want)
    order = [tuple(coords[c if i % 2 == 0 else ctas - 1 - c, i]) for i in range(rounds) for c in range(ctas)
             if i < counts[c if i % 2 == 0 else ctas - 1 - c]]  # tile t = i * ctas + (snaked) c
    chunk = heads if head_chunk is None else head_chunk
    keys = [((b, h // chunk) if head_chunk else (), -qi) for qi, b, h in order]
    assert keys == sorted(keys)


@pytest.mark.parametrize("batch,heads,blocks,ctas,head_chunk", [
    (2, 8, 5, 7, None), (2, 8, 5, 7, 4), (3, 4, 2, 5, 2), (1, 4, 2, 9, None)])  # (more CTAs than tiles)
def test_list_schedule_runs_every_tile_once_in_order_and_balances(batch, heads, blocks, ctas, head_chunk):
    """QTiles with a list schedule: each tile goes to exactly one CTA, each CTA runs its tiles in
    the global (longest-first, chunked) order, and the modelled work per CTA is balanced as greedy
    list scheduling promises (no CTA ends more than one tile's work after the least loaded one
    started its last)."""
    steps = lambda qi: 2 * (qi + 1)  # noqa: E731
    tiles = M.QTiles(batch, heads, blocks, ctas, True, head_chunk, steps=steps)
    table = jnp.asarray(tiles.table)
    n = blocks * batch * heads

    def per_cta(c):
        bound = tiles.bind(table[c])
        return bound.count(), jnp.stack([jnp.stack(bound.coords(jnp.int32(i))) for i in range(n)])
    counts, coords = jax.vmap(per_cta, axis_name="cta")(jnp.arange(tiles.ctas))
    counts, coords = np.asarray(counts), np.asarray(coords)
    got = [tuple(coords[c, i]) for c in range(tiles.ctas) for i in range(counts[c])]
    want = [(qi, b, h) for qi in range(blocks) for b in range(batch) for h in range(heads)]
    assert sorted(got) == sorted(want)
    order = np.stack(tiles.tile_at(jnp.arange(n, dtype=jnp.int32)), axis=-1)  # the global order, as the snake's
    position = {tuple(tile): t for t, tile in enumerate(order)}
    loads = []
    for c in range(tiles.ctas):
        ts = [position[tuple(coords[c, i])] for i in range(counts[c])]
        assert ts == sorted(ts)
        loads.append(sum(steps(coords[c, i, 0]) + tiles.TILE_COST for i in range(counts[c])))
    biggest = max(steps(qi) for qi in range(blocks)) + tiles.TILE_COST
    assert max(loads) - min(loads) <= biggest


def test_head_chunk_is_whole_gqa_groups_dividing_the_heads():
    assert [attn._head_chunk(w, 32, 4) for w in (None, 8, 6, 2, 64, 12)] == [None, 8, 4, 4, 32, 8]
    assert attn._head_chunk(8, 12, 4) == 4  # 8 does not divide 12


def test_supported_covers_only_what_the_kernel_computes():
    ok = dict(head_dim=128, seq_len=2048, dtype=jnp.bfloat16, causal=True, has_window=False,
              has_segments=False, softcap=None)
    assert M.supported(**ok) and M.supported(**{**ok, "has_segments": True, "has_window": True, "softcap": 30.0})
    for change in (dict(head_dim=64), dict(seq_len=2000), dict(dtype=jnp.float32), dict(causal=False)):
        assert not M.supported(**{**ok, **change})


@pytest.mark.parametrize("window,mosaic_dq,mosaic_dkv,segments", [
    (None, None, None, False), (None, False, None, False), (None, None, False, False),
    (None, False, False, False), (64, None, None, False), (256, None, None, False),  # (a window of T is dropped)
    (None, None, None, "default"), (None, False, False, "default"), (None, None, None, "opt-out")])
def test_flash_attention_takes_the_mosaic_kernels_on_sm90(monkeypatch, window, mosaic_dq, mosaic_dkv, segments):
    """With an sm_90 device (pretended), flash_attention runs the Mosaic forward and the Mosaic dq /
    dk-dv kernels (each backward kernel, if turned off in Tuning, the Triton one fed the Mosaic
    lse), packed rows and (with Tuning(mosaic_windows=True)) sliding windows too, unless
    Tuning(mosaic_packed=False) (then the Triton kernels). Lowered for CUDA on the CPU."""
    from unsloth_jax import compat
    monkeypatch.setattr(compat, "is_sm90", lambda: True)
    q, k, v, inv_freq = _inputs(2, 256, 4, 2, seed=3)
    tuning = attn.Tuning(mosaic_dq=mosaic_dq, mosaic_dkv=mosaic_dkv, mosaic_packed=segments != "opt-out",
                         mosaic_windows=True)
    seg = packed_segments(2, 256, seed=4) if segments else None
    triton = segments == "opt-out"

    def fwd_bwd(q, k, v):
        f = lambda *a: attn.flash_attention(*a, inv_freq=inv_freq, sliding_window=window, segment_ids=seg,  # noqa: E731
                                            tuning=tuning)
        out, vjp = jax.vjp(f, q, k, v)
        return out, vjp(jnp.ones_like(out))

    text = jax.jit(fwd_bwd).trace(q, k, v).lower(lowering_platforms=("cuda",)).as_text()
    assert ("flash_attention_dq" in text) == (triton or mosaic_dq is False)
    assert ("flash_attention_dkv" in text) == (triton or mosaic_dkv is False)
    assert ("mosaic_gpu" in text) == (not triton)
    assert ("flash_attention_fwd" in text) == triton


@pytest.mark.parametrize("T,fused", [(256, True), (128, False)])
def test_flash_attention_fuses_the_mosaic_backward_from_a_length_on(monkeypatch, T, fused):
    """Tuning.mosaic_fused_bwd=None: dq comes from the dk/dv kernel (its fp32 accumulator aliased
    in and out, no dq kernel) from FUSED_BWD_MIN_T positions on (lowered for CUDA on the CPU, the
    threshold lowered to 256 to keep the shapes small); the fused kernel without Pallas' automatic
    barriers (Tuning.mosaic_fused_no_auto_barriers), the separate one with them."""
    from pallas_kernels import attention_mosaic_dkv
    from unsloth_jax import compat
    monkeypatch.setattr(compat, "is_sm90", lambda: True)
    monkeypatch.setattr(attn, "FUSED_BWD_MIN_T", 256)
    no_auto_barriers = []
    real = attention_mosaic_dkv.mosaic_dkv

    def recording(*a, **kw):
        no_auto_barriers.append(kw.get("no_auto_barriers", False))
        return real(*a, **kw)
    monkeypatch.setattr(attention_mosaic_dkv, "mosaic_dkv", recording)
    q, k, v, inv_freq = _inputs(1, T, 4, 2, seed=3)

    def fwd_bwd(q, k, v):
        out, vjp = jax.vjp(lambda *a: attn.flash_attention(*a, inv_freq=inv_freq), q, k, v)
        return vjp(jnp.ones_like(out))

    text = jax.jit(fwd_bwd).trace(q, k, v).lower(lowering_platforms=("cuda",)).as_text()
    assert ("output_operand_alias" in text) == fused
    assert no_auto_barriers == [fused], no_auto_barriers


def test_flash_attention_passes_fused_backward_settings_to_the_kernel(monkeypatch):
    """Tuning.mosaic_dkv_kwargs reaches the fused kernel, over its defaults: the fused backward has
    none of Pallas' automatic warpgroup barriers by default (Tuning.mosaic_fused_no_auto_barriers),
    and with (("no_auto_barriers", False),) they are back (the forward kernel keeps its own in
    both; lowered for CUDA on the CPU)."""
    from unsloth_jax import compat
    monkeypatch.setattr(compat, "is_sm90", lambda: True)
    q, k, v, inv_freq = _inputs(1, 256, 4, 2, seed=3)

    def automatic_barriers(kwargs):
        tuning = attn.Tuning(mosaic_fused_bwd=True, mosaic_dkv_kwargs=kwargs)

        def fwd_bwd(q, k, v):
            out, vjp = jax.vjp(lambda *a: attn.flash_attention(*a, inv_freq=inv_freq, tuning=tuning), q, k, v)
            return vjp(jnp.ones_like(out))
        requested, automatic = barrier_callers(
            lambda: jax.jit(fwd_bwd).trace(q, k, v).lower(lowering_platforms=("cuda",)))
        assert requested
        return len(automatic)
    forward_only = automatic_barriers(())
    assert automatic_barriers((("no_auto_barriers", False),)) > forward_only


@pytest.mark.parametrize("B,T,Hq,Hkv,segments,tuning", [
    (1, 128, 4, 2, False, dict(mosaic_fwd_key_block=64)), (1, 100, 2, 1, True, dict(rope_in_kernel=True)),
    (1, 100, 2, 1, True, dict(window=37, mosaic_windows=True)), (1, 100, 2, 1, True, dict(rope_grad_in_kernel=True))])
def test_flash_attention_on_the_mosaic_kernels_matches_reference(monkeypatch, B, T, Hq, Hkv, segments, tuning):
    """flash_attention's Mosaic wiring end to end (lse / delta layouts, RoPE by XLA before the
    kernels (the default there; with rope_grad_in_kernel the backward kernels un-rotate dq / dk)
    or by the kernels from their tables, segment ids, a sliding window, T padded to a multiple of
    128, the custom_vjp): with sm_90 pretended and the three Mosaic kernels run by the interpreter, output
    and dq/dk/dv match the jnp reference, and the race detector sees no race in any of the three."""
    import functools

    from pallas_kernels import attention_mosaic_dkv, attention_mosaic_dq
    from unsloth_jax import compat
    monkeypatch.setattr(compat, "is_sm90", lambda: True)
    pre_rotated = []  # which backward kernels were told that q / k come rotated
    rows_early = []  # and which were asked to load lse / delta rows early (the separate dk/dv kernel's default)
    raced = []  # per kernel run: whether the race detector saw a race (its state covers one kernel)

    def interpreted(f):
        def run(*a, **kw):
            pre_rotated.append(kw.get("pre_rotated", False))
            rows_early.append(kw.get("rows_early"))
            out = jax.block_until_ready(f(*a, **kw, interpret=interpret_params()))  # eager under jax.vjp
            raced.append(races_found())
            return out
        return run
    for mod, name in ((M, "mosaic_forward"), (attention_mosaic_dq, "mosaic_dq"), (attention_mosaic_dkv, "mosaic_dkv")):
        monkeypatch.setattr(mod, name, interpreted(getattr(mod, name)))
    q, k, v, do, inv_freq = inputs(B, T, Hq, Hkv, seed=11)
    seg = packed_segments(B, T, seed=12) if segments else None
    positions = jnp.broadcast_to(jnp.arange(T), (B, T)) + 3  # per-row tables [B, T, D/2]
    tuning = dict(tuning)
    kw = dict(positions=positions, segment_ids=seg, inv_freq=inv_freq, sliding_window=tuning.pop("window", None))

    def run(f):
        out, vjp = jax.vjp(lambda *a: f(*a, **kw), q, k, v)
        return (out, *vjp(do))

    got = run(functools.partial(attn.flash_attention, tuning=attn.Tuning(**tuning)))
    want = run(flash_attention_reference)
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        err = float(jnp.max(jnp.abs(g.astype(jnp.float32) - w.astype(jnp.float32))) / jnp.max(jnp.abs(w.astype(jnp.float32))))
        assert err < 2e-2, (name, err)
    assert pre_rotated == [False] + 2 * [tuning.get("rope_grad_in_kernel", False)]  # forward, dq, dk/dv
    assert raced == [False] * 3, raced
    assert rows_early == [None, None, True], rows_early  # forward, dq, dk/dv


@pytest.mark.parametrize("rope,segments,ctas,key_block", [(False, False, 5, 64), (False, True, "sms", 64),
                                                         (True, False, 5, 64), (False, True, "sms", 128),
                                                         (False, False, None, 128), (False, True, "sms", "pingpong"),
                                                         (False, False, "sms", "list")])
def test_persistent_mosaic_forward_lowers_for_cuda(rope, segments, ctas, key_block):
    """The compiled path of the persistent forward and of 128-key tiles (wgmma with register P,
    setmaxnreg), lowered for CUDA on the CPU: catches layout errors that the interpreter does not see."""
    q, k, v, inv_freq = _inputs(1, 512, 4, 2, seed=2)
    tables = rope_tables(512, inv_freq) if rope else ()
    seg = packed_segments(1, 512, seed=3) if segments else None
    kw = (dict(key_block=128, pingpong=True) if key_block == "pingpong" else
          dict(key_block=128, early_qk=True, head_chunk=2, schedule="list") if key_block == "list" else
          dict(key_block=key_block))
    f = lambda *a: M.mosaic_forward(*a, seg=seg, scale=M.HEAD_DIM ** -0.5, ctas=ctas, **kw)  # noqa: E731
    assert "mosaic_gpu" in jax.jit(f).trace(q, k, v, *tables).lower(lowering_platforms=("cuda",)).as_text()


@pytest.mark.parametrize("window,head_dim,softcap", [(64, 128, None), (None, 256, None), (None, 128, 30.0)])
def test_windows_wide_heads_and_softcaps_stay_on_triton_unless_opted_in(monkeypatch, window, head_dim, softcap):
    """Until GPU-checked, a window shorter than T, D = 256 and a logit softcap take the Triton kernels
    by default (Tuning.mosaic_windows / mosaic_wide_heads / mosaic_softcap opt in; lowered for CUDA
    on the CPU)."""
    from unsloth_jax import compat
    monkeypatch.setattr(compat, "is_sm90", lambda: True)
    q, k, v, _, inv_freq = inputs(1, 256, 4, 2, seed=3, head_dim=head_dim)
    for opt_in in (False, True):
        tuning = dataclasses.replace(attn.default_tuning(head_dim), mosaic_windows=opt_in, mosaic_wide_heads=opt_in,
                                     mosaic_softcap=opt_in)
        f = lambda *a: attn.flash_attention(*a, inv_freq=inv_freq, sliding_window=window,  # noqa: E731
                                            logit_softcap=softcap, tuning=tuning)
        text = jax.jit(f).trace(q, k, v).lower(lowering_platforms=("cuda",)).as_text()
        assert ("mosaic_gpu" in text) == opt_in and ("flash_attention_fwd" in text) == (not opt_in)


def test_128_key_tiles_refuse_rope_tables():
    q, k, v, inv_freq = _inputs(1, 256, 2, 1, seed=2)
    with pytest.raises(ValueError, match="key_block=128 takes no RoPE tables"):
        M.mosaic_forward(q, k, v, *rope_tables(256, inv_freq), scale=0.1, key_block=128)
