"""GPU benchmark of pallas_kernels.attention.flash_attention (compiled Pallas/Triton).

1. Correctness on small shapes: forward and dq/dk/dv against the XLA reference.
2. Timing (median of repeats, block_until_ready, after warm-up) of forward and
   forward+backward for B*T = 16k tokens (T=32k: one sequence), Hq/Hkv = 32/8, D = 128,
   causal, bf16, against cuDNN (jax.nn.dot_product_attention, RoPE applied outside),
   the XLA reference and JAX's Pallas-Triton `mha` (K/V repeated, RoPE outside).
3. A small sweep of block sizes / warps at T = 8192 for D = 256 (Gemma heads).

    PYTHONPATH=$PWD python3 benchmarks/bench_attention.py [--budget 250] [--no-sweep]

Causal FLOPs: forward 2 * 2 * B * Hq * T^2 * D / 2, backward 2.5x forward.
Writes a JSON of every number to $OUT (or /tmp) as bench_attention.json.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from dataclasses import replace  # noqa: E402

from pallas_kernels.attention import (  # noqa: E402
    Tuning, apply_rope, default_tuning, flash_attention, flash_attention_reference, rope_cos_sin)

OUT = os.environ.get("OUT", "/tmp")
RESULTS: dict = {"errors": {}}
T0 = time.time()


def log(*a):
    msg = " ".join(str(x) for x in a)
    print(msg, flush=True)
    with open(os.path.join(OUT, "bench_attention_log.txt"), "a") as f:
        f.write(msg + "\n")


def record_error(key, exc):
    tb = traceback.format_exc()
    RESULTS["errors"][key] = tb[-6000:]
    log(f"ERROR {key}: {type(exc).__name__}: {str(exc)[:1500]}")


def inv_freq(D, base=500000.0):
    return jnp.asarray(1.0 / (base ** (np.arange(0, D, 2, dtype=np.float32) / D)))


def inputs(B, T, Hq, Hkv, D, dtype, seed=0):
    ks = jax.random.split(jax.random.PRNGKey(seed), 4)
    mk = lambda key, h: jax.random.normal(key, (B, T, h, D), jnp.float32).astype(dtype)  # noqa: E731
    return mk(ks[0], Hq), mk(ks[1], Hkv), mk(ks[2], Hkv), mk(ks[3], Hq)


def rel_err(a, b):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    if not np.isfinite(a).all():
        return float("nan")
    return float(np.abs(a - b).max() / np.abs(b).max())


def fwd_bwd(fn):
    @jax.jit
    def run(q, k, v, do):
        out, vjp = jax.vjp(fn, q, k, v)
        return out, vjp(do)
    return run


# Opt-in paths not yet GPU-checked (session 26, CPU only): every tuned() variant and the checks that
# name them turn these on; "ours" is the library default.
NEW_MOSAIC_PATHS = dict(mosaic_wide_heads=True, mosaic_windows=True, mosaic_softcap=True)


# ------------------------------------------------------------------ correctness

def check_correctness(only=None):
    rng = np.random.default_rng(0)

    def segs(B, T):
        rows = []
        for _ in range(B):
            cuts = np.sort(rng.choice(np.arange(1, T - 20), size=4, replace=False))
            ids = np.zeros(T, np.int32)
            for n, (s, e) in enumerate(zip([0, *cuts], [*cuts, T - 20])):
                ids[s:e] = n + 1
            rows.append(ids)
        return jnp.asarray(np.stack(rows))

    cases = [
        ("causal_rope_gqa4_d128_bf16", (2, 300, 8, 2, 128, jnp.bfloat16), dict(rope=True)),
        ("segments_window_softcap_d64_bf16", (2, 257, 8, 1, 64, jnp.bfloat16),
         dict(rope=True, segments=True, sliding_window=64, logit_softcap=30.0)),
        ("noncausal_d80_bf16", (1, 200, 4, 4, 80, jnp.bfloat16), dict(rope=True, causal=False)),
        ("softcap_d256_bf16", (1, 160, 8, 4, 256, jnp.bfloat16), dict(rope=True, logit_softcap=50.0)),
        ("segments_d96_f32", (1, 130, 4, 2, 96, jnp.float32), dict(rope=True, segments=True)),
        # T % 128 == 0, D = 128, causal, 16-bit: the Mosaic GPU forward and backward on sm_90
        ("mosaic_causal_rope_gqa4_d128_bf16", (2, 512, 8, 2, 128, jnp.bfloat16), dict(rope=True)),
        ("mosaic_causal_mha_d128_bf16", (1, 256, 4, 4, 128, jnp.bfloat16), dict()),
        ("mosaic_causal_rope_positions_gqa8_d128_bf16", (2, 384, 16, 2, 128, jnp.bfloat16),
         dict(rope=True, positions=True)),
        ("mosaic_fwd_triton_bwd_rope_gqa4_d128_bf16", (2, 512, 8, 2, 128, jnp.bfloat16),
         dict(rope=True, tuning=Tuning(mosaic_dq=False, mosaic_dkv=False))),
        ("mosaic_fwd_dq_triton_dkv_rope_gqa4_d128_bf16", (2, 512, 8, 2, 128, jnp.bfloat16),
         dict(rope=True, tuning=Tuning(mosaic_dkv=False))),
        # RoPE where it is not the default: in the Mosaic kernels, by XLA before the Triton ones
        ("mosaic_rope_in_kernel_positions_gqa4_d128_bf16", (2, 512, 8, 2, 128, jnp.bfloat16),
         dict(rope=True, positions=True, tuning=Tuning(rope_in_kernel=True))),
        ("mosaic_packed_rope_in_kernel_gqa4_d128_bf16", (2, 512, 8, 2, 128, jnp.bfloat16),
         dict(rope=True, segments=True, tuning=Tuning(rope_in_kernel=True))),
        # RoPE by XLA inside the custom_vjp, dq / dk un-rotated by the Mosaic backward kernels
        ("mosaic_rope_grad_in_kernel_positions_gqa8_d128_bf16", (2, 384, 16, 2, 128, jnp.bfloat16),
         dict(rope=True, positions=True, tuning=Tuning(rope_grad_in_kernel=True))),
        ("mosaic_packed_rope_grad_in_kernel_gqa4_d128_bf16", (2, 512, 8, 2, 128, jnp.bfloat16),
         dict(rope=True, segments=True, tuning=Tuning(rope_grad_in_kernel=True))),
        ("triton_rope_by_xla_segments_gqa4_d64_bf16", (2, 300, 8, 2, 64, jnp.bfloat16),
         dict(rope=True, segments=True, tuning=Tuning(rope_in_kernel=False))),
        # packing on the Mosaic kernels (and the Mosaic forward's lse into the Triton backward)
        ("mosaic_packed_rope_gqa4_d128_bf16", (2, 512, 8, 2, 128, jnp.bfloat16),
         dict(rope=True, segments=True, tuning=Tuning(mosaic_packed=True))),
        ("mosaic_packed_rope_positions_gqa8_d128_bf16", (2, 384, 16, 2, 128, jnp.bfloat16),
         dict(rope=True, segments=True, positions=True, tuning=Tuning(mosaic_packed=True))),
        ("mosaic_fwd_triton_bwd_packed_rope_d128_bf16", (2, 512, 8, 2, 128, jnp.bfloat16),
         dict(rope=True, segments=True, tuning=Tuning(mosaic_packed=True, mosaic_dq=False, mosaic_dkv=False))),
        # the fused backward (Tuning(mosaic_fused_bwd=True)), plain and packed
        ("mosaic_fused_bwd_rope_gqa4_d128_bf16", (2, 512, 8, 2, 128, jnp.bfloat16),
         dict(rope=True, tuning=Tuning(mosaic_fused_bwd=True))),
        ("mosaic_packed_fused_bwd_rope_positions_gqa8_d128_bf16", (2, 384, 16, 2, 128, jnp.bfloat16),
         dict(rope=True, segments=True, positions=True, tuning=Tuning(mosaic_fused_bwd=True))),
        # the persistent forward's tiles by chunks of 8 heads (Tuning(mosaic_fwd_head_chunk=8))
        ("mosaic_fwd_heads_by_8_rope_gqa4_d128_bf16", (2, 512, 16, 4, 128, jnp.bfloat16),
         dict(rope=True, tuning=Tuning(mosaic_fwd_head_chunk=8))),
        # ... and as a list schedule read from a table (Tuning(mosaic_fwd_schedule="list")), packed too
        ("mosaic_fwd_list_heads_by_8_rope_gqa4_d128_bf16", (2, 512, 16, 4, 128, jnp.bfloat16),
         dict(rope=True, tuning=Tuning(mosaic_fwd_head_chunk=8, mosaic_fwd_schedule="list"))),
        ("mosaic_fwd_list_packed_rope_gqa4_d128_bf16", (2, 512, 8, 2, 128, jnp.bfloat16),
         dict(rope=True, segments=True, tuning=Tuning(mosaic_fwd_schedule="list"))),
        # one dk/dv consumer code for both warpgroups (Tuning(mosaic_dkv_static_consumers=False))
        ("mosaic_consumers_by_index_rope_gqa4_d128_bf16", (2, 512, 8, 2, 128, jnp.bfloat16),
         dict(rope=True, tuning=Tuning(mosaic_dkv_static_consumers=False))),
        # sliding windows on the Mosaic kernels (session 26): separate and fused backward, packed
        ("mosaic_window_rope_gqa4_d128_bf16", (2, 512, 8, 2, 128, jnp.bfloat16),
         dict(rope=True, sliding_window=200, tuning=Tuning(**NEW_MOSAIC_PATHS))),
        ("mosaic_window_packed_fused_bwd_rope_gqa4_d128_bf16", (2, 512, 8, 2, 128, jnp.bfloat16),
         dict(rope=True, segments=True, sliding_window=130, tuning=Tuning(mosaic_fused_bwd=True, **NEW_MOSAIC_PATHS))),
        ("mosaic_window_packed_rope_gqa2_d256_bf16", (2, 384, 4, 2, 256, jnp.bfloat16),
         dict(rope=True, segments=True, sliding_window=100, tuning=replace(default_tuning(256), **NEW_MOSAIC_PATHS))),
        # logit softcaps on the Mosaic kernels (Gemma-2's three quirks together at D = 256), and at D = 128 fused
        ("mosaic_window_softcap_packed_rope_gqa2_d256_bf16", (2, 384, 4, 2, 256, jnp.bfloat16),
         dict(rope=True, segments=True, sliding_window=100, logit_softcap=20.0,
              tuning=replace(default_tuning(256), **NEW_MOSAIC_PATHS))),
        ("mosaic_window_softcap_fused_bwd_rope_gqa4_d128_bf16", (2, 512, 8, 2, 128, jnp.bfloat16),
         dict(rope=True, sliding_window=300, logit_softcap=20.0, tuning=Tuning(mosaic_fused_bwd=True, **NEW_MOSAIC_PATHS))),
        # D = 256 (session 26): the Mosaic forward, dq and wide dk/dv (RoPE by XLA); the Triton dk/dv opt-out
        ("mosaic_causal_rope_gqa2_d256_bf16", (2, 512, 4, 2, 256, jnp.bfloat16),
         dict(rope=True, tuning=replace(default_tuning(256), **NEW_MOSAIC_PATHS))),
        ("mosaic_fwd_dq_triton_dkv_rope_d256_bf16", (1, 512, 4, 2, 256, jnp.bfloat16),
         dict(rope=True, tuning=replace(default_tuning(256), mosaic_dkv=False, **NEW_MOSAIC_PATHS))),
        ("mosaic_packed_rope_positions_gqa2_d256_bf16", (2, 384, 4, 2, 256, jnp.bfloat16),
         dict(rope=True, segments=True, positions=True, tuning=replace(default_tuning(256), **NEW_MOSAIC_PATHS))),
        ("mosaic_fwd_early_qk_dq_v_with_k_d256_bf16", (1, 512, 4, 2, 256, jnp.bfloat16),
         dict(rope=True, tuning=replace(default_tuning(256), mosaic_fwd_kwargs=(("early_qk", True),),
                                        mosaic_dq_kwargs=(("early_v", False),), **NEW_MOSAIC_PATHS))),
        # dk/dv variants (session 19): the lse / delta rows loaded first
        ("mosaic_packed_rows_early_rope_positions_gqa8_d128_bf16", (2, 384, 16, 2, 128, jnp.bfloat16),
         dict(rope=True, segments=True, positions=True, tuning=Tuning(mosaic_dkv_kwargs=(("rows_early", True),)))),
        ("mosaic_packed_dq_static_consumers_rope_positions_gqa8_d128_bf16", (2, 384, 16, 2, 128, jnp.bfloat16),
         dict(rope=True, segments=True, positions=True, tuning=Tuning(mosaic_dq_static_consumers=True))),
    ]
    ok = True
    for name, (B, T, Hq, Hkv, D, dtype), opts in cases:
        if only and not any(part in name for part in only.split(",")):
            continue
        q, k, v, do = inputs(B, T, Hq, Hkv, D, dtype, seed=1)
        kw = {key: opts[key] for key in ("sliding_window", "logit_softcap", "causal") if key in opts}
        if opts.get("positions"):  # per-row offsets: [B, T, D/2] RoPE tables
            kw["positions"] = jnp.arange(T)[None] + 7 * jnp.arange(B)[:, None]
        if opts.get("rope"):
            kw["inv_freq"] = inv_freq(D, 10000.0)
        if opts.get("segments"):
            kw["segment_ids"] = segs(B, T)
        try:
            t = time.time()
            got = fwd_bwd(lambda *a: flash_attention(*a, **kw, tuning=opts.get("tuning")))(q, k, v, do)
            jax.block_until_ready(got)
            compile_s = time.time() - t
            with jax.default_matmul_precision("highest"):
                want = fwd_bwd(lambda *a: flash_attention_reference(*a, **kw))(q, k, v, do)
            errs = [rel_err(g, w) for g, w in zip((got[0], *got[1]), (want[0], *want[1]))]
            tol = 1e-4 if dtype == jnp.float32 else 2e-2
            passed = all(e < tol for e in errs)  # NaN fails
            ok &= passed
            RESULTS.setdefault("correctness", {})[name] = dict(errs=errs, passed=passed)
            log(f"check {name:36s} {'PASS' if passed else 'FAIL'} out/dq/dk/dv rel err "
                + " ".join(f"{e:.1e}" for e in errs) + f"  (compile+run {compile_s:.1f}s)")
        except Exception as e:  # keep going: later cases / timings still tell us something
            ok = False
            record_error(f"check_{name}", e)
    return ok


# ------------------------------------------------------------------ timing

def warm_up(fn, *args):
    jax.block_until_ready(fn(*args))  # compile
    jax.block_until_ready(fn(*args))  # warm


def sample_ms(fn, *args, reps=10):
    """Wall-clock ms of reps calls, one each."""
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append((time.perf_counter() - t) * 1e3)
    return times


def timeit(fn, *args, reps=10):
    warm_up(fn, *args)
    return statistics.median(sample_ms(fn, *args, reps=reps))


def packed_documents(B, T, seed=0, min_len=64, max_len=1024):
    """int32 [B, T]: documents of uniform random lengths, then 5% padding (segment 0)."""
    rng = np.random.default_rng(seed)
    ids = np.zeros((B, T), np.int32)
    for b in range(B):
        t, n, end = 0, 1, int(T * 0.95)
        while t < end:
            length = int(rng.integers(min_len, max_len + 1))
            ids[b, t:min(t + length, end)] = n
            t, n = t + length, n + 1
    return jnp.asarray(ids)


def bench_packed(T, B, Hq=32, Hkv=8, D=128):
    """Packed rows (segment ids): the Mosaic kernels against the Triton ones on the same packing,
    and the Mosaic kernels on the same tokens unpacked (plain causal: what skipping saves)."""
    q, k, v, do = inputs(B, T, Hq, Hkv, D, jnp.bfloat16)
    freq, seg = inv_freq(D), packed_documents(B, T)
    impls = {
        "ours packed (Mosaic)": lambda q, k, v: flash_attention(q, k, v, inv_freq=freq, segment_ids=seg,
                                                                tuning=Tuning(mosaic_packed=True)),
        "ours packed (Triton)": lambda q, k, v: flash_attention(q, k, v, inv_freq=freq, segment_ids=seg,
                                                                tuning=Tuning(mosaic_fwd=False)),
        "ours unpacked causal (Mosaic)": lambda q, k, v: flash_attention(q, k, v, inv_freq=freq),
    }
    for name, fn in impls.items():
        try:
            f_ms, fb_ms = timeit(jax.jit(fn), q, k, v), timeit(fwd_bwd(fn), q, k, v, do)
        except Exception as e:
            record_error(f"packed_{name}_T{T}", e)
            continue
        RESULTS.setdefault("packed", []).append(dict(impl=name, T=T, B=B, fwd_ms=f_ms, fwdbwd_ms=fb_ms))
        log(f"  packed T={T:6d} B={B} {name:32s} fwd {f_ms:8.3f} ms | fwd+bwd {fb_ms:8.3f} ms")


def causal_fwd_flops(B, T, Hq, D):
    return 2 * 2 * B * Hq * T * T * D / 2


def compile_impls(table, names, T, do):
    """[(name, jitted forward, jitted fwd+bwd or None, args)] in the order asked for, each compiled and
    warmed (its ptxas lines follow its 'compiling' line in the log); a budget cuts the least wanted.
    table: name -> (fn, args), or a function building them (baselines that need imports or set-up)."""
    ready = []
    for name in dict.fromkeys(names):  # a name given twice is timed once (rounds repeat it)
        if time.time() - T0 > ARGS.budget:
            log(f"  (budget reached, skipping {name} T={T})")
            continue
        log(f"  compiling {name} T={T}")
        spec = table[name]
        try:
            fn, args = spec() if callable(spec) else spec
            fwd = jax.jit(fn)
            warm_up(fwd, *args)
        except Exception as e:
            record_error(f"time_{name}_T{T}", e)
            continue
        fb = fwd_bwd(fn)
        try:
            warm_up(fb, *args, do)
        except Exception as e:  # a forward-only baseline
            record_error(f"time_bwd_{name}_T{T}", e)
            fb = None
        ready.append((name, fwd, fb, (*args, do)))
    return ready


def interleaved_samples(ready, T):
    """{name: (forward rounds, fwd+bwd rounds)} of wall-clock ms: --rounds rounds, each timing every
    implementation in turn (--reps calls each), so a clock drift during the run spreads over all
    of them instead of biasing whichever ran then. Rounds after the first stop at the budget."""
    samples = {name: ([], []) for name, *_ in ready}
    for r in range(ARGS.rounds):
        if r and time.time() - T0 > ARGS.budget:
            log(f"  (budget reached after {r} rounds at T={T})")
            break
        for name, fwd, fb, args in ready:
            samples[name][0].append(sample_ms(fwd, *args[:-1], reps=ARGS.reps))
            if fb is not None:
                samples[name][1].append(sample_ms(fb, *args, reps=ARGS.reps))
    return samples


def bench_shape(T, B, Hq=32, Hkv=8, D=128, impls=None):
    dtype = jnp.bfloat16
    q, k, v, do = inputs(B, T, Hq, Hkv, D, dtype)
    freq = inv_freq(D)
    pos = jnp.broadcast_to(jnp.arange(T), (B, T))
    fl = causal_fwd_flops(B, T, Hq, D)
    rows = []

    def rope_outside(q, k):
        cos, sin = rope_cos_sin(pos, freq)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin)

    qr, kr = jax.jit(rope_outside)(q, k)

    def cudnn(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")

    def cudnn_rope(q, k, v):
        return cudnn(*rope_outside(q, k), v)

    def tuned(**kw):  # this head size's defaults with some fields changed (and the opt-in Mosaic paths on)
        return replace(default_tuning(D), **{**NEW_MOSAIC_PATHS, **kw})

    def ours(q, k, v):  # the defaults: on sm_90 RoPE by XLA just before the Mosaic kernels
        return flash_attention(q, k, v, inv_freq=freq)

    def ours_rope_in_kernel(q, k, v):
        return flash_attention(q, k, v, inv_freq=freq, tuning=tuned(rope_in_kernel=True))

    def ours_rope_grad_in_kernel(q, k, v):  # XLA RoPE, dq / dk un-rotated by the backward kernels
        return flash_attention(q, k, v, inv_freq=freq, tuning=tuned(rope_grad_in_kernel=True))

    def ours_in_order(q, k, v):  # the Mosaic kernels' launch order before session 7
        return flash_attention(q, k, v, inv_freq=freq, tuning=tuned(mosaic_longest_first=False))

    def ours_one_tile_per_cta(q, k, v):  # the forward before session 10 (not persistent)
        return flash_attention(q, k, v, inv_freq=freq, tuning=tuned(mosaic_persistent_fwd=False))

    def ours_rope_tables_kept(q, k, v):  # XLA RoPE with cos/sin materialized once, not recomputed per head
        cos, sin = jax.lax.optimization_barrier(rope_cos_sin(pos, freq))
        return flash_attention(apply_rope(q, cos, sin), apply_rope(k, cos, sin), v)

    def ours_fwd_64_keys(q, k, v):  # the Mosaic forward on 64-key steps (the default before session 11)
        return flash_attention(q, k, v, inv_freq=freq, tuning=tuned(mosaic_fwd_key_block=64))

    def ours_fwd_pingpong(q, k, v):  # 128-key steps with ping-pong consumers
        return flash_attention(q, k, v, inv_freq=freq, tuning=tuned(mosaic_fwd_pingpong=True))

    def ours_fwd_scale_apart(q, k, v):  # the forward's softmax scale multiplied before the max (before session 15)
        return flash_attention(q, k, v, inv_freq=freq, tuning=tuned(mosaic_fwd_fold_scale=False))

    def ours_fwd_late_qk(q, k, v):  # each forward step waits for its PV before the next QK^T (before session 17)
        return flash_attention(q, k, v, inv_freq=freq, tuning=tuned(mosaic_fwd_early_qk=False))

    def ours_norope(q, k, v):
        return flash_attention(q, k, v)

    def ours_triton(q, k, v):  # the Triton kernels even where the Mosaic ones apply
        return flash_attention(q, k, v, inv_freq=freq, tuning=tuned(mosaic_fwd=False))

    def ours_triton_rope_xla(q, k, v):
        return flash_attention(q, k, v, inv_freq=freq, tuning=tuned(mosaic_fwd=False, rope_in_kernel=False))

    def ours_triton_bwd(q, k, v):  # the Mosaic forward, the Triton backward
        return flash_attention(q, k, v, inv_freq=freq, tuning=tuned(mosaic_dq=False, mosaic_dkv=False))

    def ours_fused_bwd(q, k, v):  # dq from the dk/dv kernel (reduce-adds) instead of the dq kernel
        return flash_attention(q, k, v, inv_freq=freq, tuning=tuned(mosaic_fused_bwd=True))

    def ours_separate_bwd(q, k, v):  # the dq and dk/dv kernels at every length (before session 18: from 16k on fused)
        return flash_attention(q, k, v, inv_freq=freq, tuning=tuned(mosaic_fused_bwd=False))

    def ours_dq_static_consumers(q, k, v):  # the dq kernel's consumers specialised too (not the default yet)
        return flash_attention(q, k, v, inv_freq=freq, tuning=tuned(mosaic_dq_static_consumers=True))

    def ours_consumers_by_index(q, k, v):  # one dk/dv consumer code for both (before session 18)
        return flash_attention(q, k, v, inv_freq=freq, tuning=tuned(mosaic_dkv_static_consumers=False))

    def ours_dkv_with(fused=None, **kw):  # the dk/dv kernel with launch settings not yet default (rows_early, ...)
        tuning = tuned(mosaic_fused_bwd=fused, mosaic_dkv_kwargs=tuple(kw.items()))
        return lambda q, k, v: flash_attention(q, k, v, inv_freq=freq, tuning=tuning)

    def ours_fused_with(**kw):  # the fused backward with such settings (rows_early, ...)
        return ours_dkv_with(fused=True, **kw)

    def ours_fwd_order(heads=None, schedule="snake"):  # the persistent forward's tile order and schedule
        tuning = tuned(mosaic_fwd_head_chunk=heads, mosaic_fwd_schedule=schedule)
        return lambda q, k, v: flash_attention(q, k, v, inv_freq=freq, tuning=tuning)

    def ours_triton_dkv(q, k, v):  # the Mosaic forward and dq, the Triton dk/dv
        return flash_attention(q, k, v, inv_freq=freq, tuning=tuned(mosaic_dkv=False))

    def reference(q, k, v):
        return flash_attention_reference(q, k, v, inv_freq=freq)

    def jax_mha():
        from jax.experimental.pallas.ops.gpu import attention as jattn

        rep = lambda x: jnp.repeat(x, Hq // Hkv, axis=2)  # noqa: E731
        kk, vv = jax.jit(rep)(kr), jax.jit(rep)(v)

        def f(q, k, v):
            return jattn.mha(q, k, v, None, sm_scale=D ** -0.5, causal=True)
        return f, (qr, kk, vv)

    def jax_mosaic():
        # JAX's Mosaic GPU (wgmma/TMA) flash attention, for scale: forward only (its backward has no
        # causal mask yet), pre-rotated q/k, GQA native.
        from jax.experimental.pallas.ops.gpu import attention_mgpu as mgpu

        cfg = mgpu.TuningConfig(block_q=64, block_kv=128, max_concurrent_steps=2, causal=True)
        f16 = lambda x: x.astype(jnp.float16)  # noqa: E731 - its kernel is float16-only inside
        return (lambda q, k, v: mgpu.attention(q, k, v, cfg)), (f16(qr), f16(kr), f16(v))

    def tokamax_mosaic():
        # tokamax's Mosaic GPU flash attention (forward and backward; GQA native), pre-rotated q/k.
        # Not on the GPU image: carry its wheels (benchmarks/prepare_tokamax_site.sh).
        import tokamax

        def f(q, k, v):
            return tokamax.dot_product_attention(q, k, v, is_causal=True, implementation="mosaic")
        err = jnp.max(jnp.abs(jax.jit(f)(qr, kr, v).astype(jnp.float32) - jax.jit(cudnn)(qr, kr, v).astype(jnp.float32)))
        log(f"  tokamax {tokamax.__version__}: max |out - cuDNN's| {float(err):.2e}")
        return f, (qr, kr, v)

    table = {
        "ours": (ours, (q, k, v)),
        "ours, RoPE in kernel": (ours_rope_in_kernel, (q, k, v)),
        "ours, RoPE grad in kernel": (ours_rope_grad_in_kernel, (q, k, v)),
        "ours (no RoPE)": (ours_norope, (q, k, v)),
        "ours + XLA RoPE, tables kept": (ours_rope_tables_kept, (q, k, v)),
        "ours, in-order grid": (ours_in_order, (q, k, v)),
        "ours, fwd not persistent": (ours_one_tile_per_cta, (q, k, v)),
        "ours, fwd 64-key steps": (ours_fwd_64_keys, (q, k, v)),
        "ours, fwd 128-key steps, ping-pong": (ours_fwd_pingpong, (q, k, v)),
        "ours, fwd scale not folded": (ours_fwd_scale_apart, (q, k, v)),
        "ours, fwd QK^T after PV": (ours_fwd_late_qk, (q, k, v)),
        "ours, Triton (RoPE in kernel)": (ours_triton, (q, k, v)),
        "ours, Triton (RoPE by XLA)": (ours_triton_rope_xla, (q, k, v)),
        "ours, Triton bwd": (ours_triton_bwd, (q, k, v)),
        "ours, Triton dk/dv": (ours_triton_dkv, (q, k, v)),
        "ours, fused bwd": (ours_fused_bwd, (q, k, v)),
        "ours, separate bwd": (ours_separate_bwd, (q, k, v)),
        "ours, dk/dv consumers by index": (ours_consumers_by_index, (q, k, v)),
        "ours, dq static consumers": (ours_dq_static_consumers, (q, k, v)),
        "ours, dk/dv rows early": (ours_dkv_with(rows_early=True), (q, k, v)),  # below 16k the default since session 22
        "ours, dk/dv rows late": (ours_dkv_with(rows_early=False), (q, k, v)),  # the default before session 22
        "ours, fused bwd, rows early": (ours_fused_with(rows_early=True), (q, k, v)),
        "ours, auto barriers": (lambda q, k, v: flash_attention(q, k, v, inv_freq=freq, tuning=tuned(
            mosaic_fused_no_auto_barriers=False)), (q, k, v)),  # from 16k the default before session 23
        "ours, fwd heads by 8": (ours_fwd_order(8), (q, k, v)),  # 2 K/V heads at a time
        "ours, fwd heads by 16": (ours_fwd_order(16), (q, k, v)),
        "ours, fwd list": (ours_fwd_order(schedule="list"), (q, k, v)),  # balanced by a table
        "ours, fwd list heads by 8": (ours_fwd_order(8, "list"), (q, k, v)),
        # D = 256 (the Mosaic kernels since session 26): variants
        "ours, fwd early QK^T": (lambda q, k, v: flash_attention(q, k, v, inv_freq=freq, tuning=tuned(
            mosaic_fwd_kwargs=(("early_qk", True),))), (q, k, v)),
        "ours, dq V with K": (lambda q, k, v: flash_attention(q, k, v, inv_freq=freq, tuning=tuned(
            mosaic_dq_kwargs=(("early_v", False),))), (q, k, v)),
        "cudnn (pre-rotated)": (cudnn, (qr, kr, v)),
        "cudnn + XLA RoPE": (cudnn_rope, (q, k, v)),
        # a sliding window of 1024 keys (Gemma-3's local layers; Mistral's is 4096): ours, Triton's, cuDNN's
        "ours, opt-in Mosaic paths": (lambda q, k, v: flash_attention(q, k, v, inv_freq=freq, tuning=tuned()), (q, k, v)),
        "ours, window 1024": (lambda q, k, v: flash_attention(q, k, v, inv_freq=freq, sliding_window=1024,
                                                               tuning=tuned()), (q, k, v)),
        "ours, Triton, window 1024": (lambda q, k, v: flash_attention(q, k, v, inv_freq=freq, sliding_window=1024,
                                                                       tuning=tuned(mosaic_fwd=False)), (q, k, v)),
        "ours, window 4096, softcap 50": (lambda q, k, v: flash_attention(  # Gemma-2's local layers
            q, k, v, inv_freq=freq, sliding_window=4096, logit_softcap=50.0, tuning=tuned()), (q, k, v)),
        "ours, Triton, window 4096, softcap 50": (lambda q, k, v: flash_attention(
            q, k, v, inv_freq=freq, sliding_window=4096, logit_softcap=50.0, tuning=tuned(mosaic_fwd=False)), (q, k, v)),
        "cudnn + XLA RoPE, window 1024": (lambda q, k, v: jax.nn.dot_product_attention(
            *rope_outside(q, k), v, is_causal=True, local_window_size=(1023, 0), implementation="cudnn"), (q, k, v)),
        "XLA reference": (reference, (q, k, v)),
        "jax pallas mha (pre-rot, K/V repeated)": jax_mha,
        "jax mosaic gpu (pre-rot, fwd only)": jax_mosaic,
        "tokamax mosaic (pre-rotated)": tokamax_mosaic,
    }
    unknown = [name for name in impls or () if name not in table]
    if unknown:
        raise SystemExit(f"--impls: no implementation named {unknown}; known: {list(table)}")
    ready = compile_impls(table, impls or list(table), T, do)
    samples = interleaved_samples(ready, T)
    base = samples.get("cudnn + XLA RoPE")
    for name, (fwd, fb) in samples.items():
        f_ms, fb_ms = statistics.median(sum(fwd, [])), statistics.median(sum(fb, [])) if fb else float("nan")
        row = dict(impl=name, T=T, B=B, D=D, Hq=Hq, Hkv=Hkv, fwd_ms=f_ms, fwdbwd_ms=fb_ms,
                   fwd_tflops=fl / f_ms / 1e9, fwdbwd_tflops=3.5 * fl / fb_ms / 1e9,
                   fwdbwd_round_ms=[statistics.median(r) for r in fb])
        vs = ""
        if base and base[1] and fb and name != "cudnn + XLA RoPE":  # per round: the drift between rounds cancels
            ratios = [statistics.median(a) / statistics.median(c) for a, c in zip(fb, base[1])]
            fwd_ratios = [statistics.median(a) / statistics.median(c) for a, c in zip(fwd, base[0])]
            row["fwdbwd_x_cudnn_rounds"], row["fwd_x_cudnn_rounds"] = ratios, fwd_ratios
            vs = (f" | x cuDNN+RoPE {statistics.median(ratios):.3f} (rounds {' '.join(f'{r:.3f}' for r in ratios)})"
                  f" fwd {statistics.median(fwd_ratios):.3f}")
        rows.append(row)
        log(f"  T={T:6d} B={B} D={D} {name:40s} fwd {f_ms:8.3f} ms {row['fwd_tflops']:6.0f} TF/s | "
            f"fwd+bwd {fb_ms:8.3f} ms {row['fwdbwd_tflops']:6.0f} TF/s{vs}")
    RESULTS.setdefault("timing", []).extend(rows)
    return rows


def sweep_variants(D):
    """(forward variants, backward variants) around the current default for head size D."""
    if D > 128:  # D=256 (Gemma): shared memory bounds the tiles
        base = replace(default_tuning(256), fwd_q=64, fwd_warps=4, dq_q=64, dq_warps=4, dkv_k=32,
                       dkv_warps=4)  # the D=256 default before run 4 (attention_NOTES.md)
        return ({"fwd 64x32 w4 s2 (old default)": base,
                 "fwd 64x64 w4 s2": replace(base, fwd_k=64),
                 "fwd 128x32 w8 s2": replace(base, fwd_q=128, fwd_warps=8),
                 "fwd 128x64 w8 s2": replace(base, fwd_q=128, fwd_k=64, fwd_warps=8),
                 "fwd 64x32 w4 s3": replace(base, fwd_stages=3)},
                {"bwd dq64x32 dkv32x32 w4 s2 (old default)": base,
                 "bwd dq64x64 w4 dkv64x32 w4 s2": replace(base, dq_k=64, dkv_k=64),
                 "bwd dq128x32 w8 dkv64x32 w8 s2": replace(base, dq_q=128, dq_warps=8, dkv_k=64,
                                                          dkv_warps=8),
                 "bwd dq64x32 w4 dkv64x64 w8 s2": replace(base, dkv_k=64, dkv_q=64, dkv_warps=8)})
    base = Tuning()
    return ({"fwd 128x64 w8 s3 (default)": base, "fwd 128x64 w8 s4": Tuning(fwd_stages=4)},
            {"bwd dq128x64 dkv128x64 w8 s3 (default)": base,
             "bwd dq128x64 dkv128x32 w8 s3": Tuning(dkv_q=32)})


def sweep(T=8192, B=2, Hq=32, Hkv=8, D=128):
    q, k, v, do = inputs(B, T, Hq, Hkv, D, jnp.bfloat16)
    freq = inv_freq(D)
    fl = causal_fwd_flops(B, T, Hq, D)
    fwd_variants, bwd_variants = sweep_variants(D)
    for name, tn in fwd_variants.items():
        if time.time() - T0 > ARGS.budget:
            log(f"  (budget reached, skipping {name})")
            continue
        try:
            ms = timeit(jax.jit(lambda q, k, v, tn=tn: flash_attention(q, k, v, inv_freq=freq,
                                                                        tuning=tn)), q, k, v)
            log(f"  sweep T={T} D={D} {name:40s} fwd {ms:8.3f} ms {fl / ms / 1e9:6.0f} TF/s")
            RESULTS.setdefault("sweep", []).append(dict(variant=name, D=D, fwd_ms=ms))
        except Exception as e:
            record_error(f"sweep_D{D}_{name}", e)
    for name, tn in bwd_variants.items():
        if time.time() - T0 > ARGS.budget:
            log(f"  (budget reached, skipping {name})")
            continue
        try:
            ms = timeit(fwd_bwd(lambda q, k, v, tn=tn: flash_attention(q, k, v, inv_freq=freq,
                                                                        tuning=tn)), q, k, v, do)
            log(f"  sweep T={T} D={D} {name:40s} fwd+bwd {ms:8.3f} ms {3.5 * fl / ms / 1e9:6.0f} TF/s")
            RESULTS.setdefault("sweep", []).append(dict(variant=name, D=D, fwdbwd_ms=ms))
        except Exception as e:
            record_error(f"sweep_D{D}_{name}", e)


def bench_d256():  # Gemma-2-9B-like heads: D = 256, Hq/Hkv = 16/8
    impls = ARGS.d256_impls.split(";") if ARGS.d256_impls else ["ours", "cudnn + XLA RoPE", "cudnn (pre-rotated)"]
    bench_shape(8192, 2, Hq=16, Hkv=8, D=256, impls=impls)


def restart_budget_clock():
    global T0
    T0 = time.time()


def main():
    log(f"jax {jax.__version__} devices {jax.devices()} kind {jax.devices()[0].device_kind}")
    RESULTS["env"] = dict(jax=jax.__version__, device=jax.devices()[0].device_kind,
                          date=time.strftime("%Y-%m-%d %H:%M:%S"))
    try:
        if ARGS.d256_only:  # re-check and re-time the D=256 defaults only
            ok = check_correctness(only=ARGS.checks or "d256")
            log(f"correctness: {'ALL PASS' if ok else 'FAILURES'} ({time.time() - T0:.0f}s)")
            restart_budget_clock()
            bench_d256()
            return
        if ARGS.packed:  # packing: its checks, then packed timings
            ok = check_correctness(only="packed")
            log(f"correctness: {'ALL PASS' if ok else 'FAILURES'}")
            for T, B in [(2048, 8), (8192, 2)]:
                bench_packed(T, B)
            return
        if ARGS.timing_only:  # D=128 at 2k and 8k, chosen implementations (checks only with --checks)
            if ARGS.checks is not None:
                ok = check_correctness(only=ARGS.checks or None)
                log(f"correctness: {'ALL PASS' if ok else 'FAILURES'} ({time.time() - T0:.0f}s)")
                restart_budget_clock()  # --budget is the timings' (the checks ate session 25's: 110 of 160 s)
            for T in map(int, ARGS.seqs.split(",")):  # B*T = 16k tokens (one row past 16k)
                bench_shape(T, max(1, 16384 // T), impls=ARGS.impls.split(";") if ARGS.impls else None)
            if ARGS.d256:
                bench_d256()
            return
        ok = check_correctness()
        log(f"correctness: {'ALL PASS' if ok else 'FAILURES'} ({time.time() - T0:.0f}s)")
        for T, B in [(2048, 8), (8192, 2)]:
            bench_shape(T, B, impls=ARGS.impls.split(";") if ARGS.impls else None)
        if ARGS.sweep:
            sweep(Hq=16, Hkv=8, D=256)
        if not ARGS.skip_32k:
            bench_shape(32768, 1, impls=["ours", "cudnn (pre-rotated)",
                                         "cudnn + XLA RoPE"])
        if not ARGS.skip_32k:
            bench_d256()
    finally:
        with open(os.path.join(OUT, "bench_attention.json"), "w") as f:
            json.dump(RESULTS, f, indent=1)
        log("\nsummary (median ms; TF/s causal, fwd+bwd = 3.5x fwd FLOPs)")
        for r in RESULTS.get("timing", []):
            log(f"T={r['T']:6d} B={r['B']} D={r['D']} {r['impl']:40s} fwd {r['fwd_ms']:8.3f} "
                f"({r['fwd_tflops']:4.0f}) fwd+bwd {r['fwdbwd_ms']:8.3f} ({r['fwdbwd_tflops']:4.0f})")
        log(f"errors: {list(RESULTS['errors'])}  total {time.time() - T0:.0f}s")


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--budget", type=float, default=250.0,
                   help="seconds before skipping the rest (with --timing-only --checks: counted after the checks)")
    p.add_argument("--no-sweep", dest="sweep", action="store_false")
    p.add_argument("--skip-32k", action="store_true")
    p.add_argument("--d256-only", action="store_true", help="only the D=256 checks and timing (--budget counted "
                   "after the checks)")
    p.add_argument("--timing-only", action="store_true", help="only D=128 timings (at --seqs)")
    p.add_argument("--packed", action="store_true", help="only the packing checks and packed timings")
    p.add_argument("--checks", default=None, help="with --timing-only: first the correctness checks "
                   "whose name contains this, or one of these comma-separated parts ('' = all); with --d256-only "
                   "those instead of the D=256 ones")
    p.add_argument("--impls", default="", help="';'-separated implementation names for the D=128 2k/8k timings")
    p.add_argument("--seqs", default="2048,8192", help="with --timing-only: the sequence lengths (B = 16k / T)")
    p.add_argument("--rounds", type=int, default=1, help="timing rounds, each over every implementation in "
                   "turn (ratios to cuDNN + XLA RoPE taken per round)")
    p.add_argument("--reps", type=int, default=10, help="timed calls per implementation per round")
    p.add_argument("--d256", action="store_true", help="with --timing-only: also D=256 (Hq/Hkv 16/8) at T=8k")
    p.add_argument("--d256-impls", default="", help="';'-separated implementation names for the D=256 timing")
    ARGS = p.parse_args()
    main()
