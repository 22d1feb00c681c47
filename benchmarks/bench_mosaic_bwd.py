#!/usr/bin/env python3
"""The Mosaic GPU attention kernels (backward: pallas_kernels/attention_mosaic_dq.py / _dkv.py; the
forward with --kernel fwd) on the GPU: a correctness check against the reference (its VJP) at small
shapes, then their times at the benchmark shapes, for the backward next to our Triton backward
(dq + dk/dv kernels) measured in the same process.

    PYTHONPATH=$PWD timeout 200 python3 benchmarks/bench_mosaic_bwd.py --kernel dq
    PYTHONPATH=$PWD timeout 200 python3 benchmarks/bench_mosaic_bwd.py --kernel dkv --kwargs '{"p_regs": true}' --no-baseline
    PYTHONPATH=$PWD timeout 300 python3 benchmarks/bench_mosaic_bwd.py --kernel bwd --no-rope --kwargs '[{"fused": false}, {"fused": true}]'

--kernel bwd: the whole Mosaic backward (dk, dv, dq): {"fused": false} the dq and dk/dv kernels,
{"fused": true} dk/dv with_dq (other keys go to the dk/dv kernel, e.g. "ds_under_dv": false).
--kernel fwd: the Mosaic forward (attention_mosaic.mosaic_forward), its output checked, e.g.
    ... --kernel fwd --no-rope --kwargs '[{}, {"regs": [240, 24]}]'

--kwargs: launch settings of the kernel (JSON, e.g. stages, regs, p_regs), or a list
of them: variants timed in one process, in interleaved rounds (a variant that fails to compile is
dropped; one that hangs takes the process, so run untried launch settings alone under `timeout`).
A "module" key times mosaic_<kernel> from another module, e.g. the file at an earlier commit:
    git show b32b62a:pallas_kernels/attention_mosaic_dq.py > benchmarks/dq_before_s8.py
    ... --kernel dq --no-rope --kwargs '[{"module": "benchmarks.dq_before_s8"}, {}]'
(--kernel fwd: mosaic_forward from that module.) "ctas": "sms" runs the forward or dq kernel
persistent, one CTA per SM.
"""
import argparse
import functools
import json
import importlib
import math
import statistics
import time

import jax
import jax.numpy as jnp

from pallas_kernels import attention as attn
from pallas_kernels.attention import flash_attention_reference

LOG2E = math.log2(math.e)


def timeit(f, *a, reps=10):
    jax.block_until_ready(f(*a)); jax.block_until_ready(f(*a))
    ts = []
    for _ in range(reps):
        t = time.perf_counter(); jax.block_until_ready(f(*a)); ts.append(time.perf_counter() - t)
    return statistics.median(ts) * 1e3


def inputs(B, T, Hq, Hkv, D=128, seed=0):
    ks = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(ks[0], (B, T, Hq, D), jnp.bfloat16)
    k = jax.random.normal(ks[1], (B, T, Hkv, D), jnp.bfloat16)
    v = jax.random.normal(ks[2], (B, T, Hkv, D), jnp.bfloat16)
    do = jax.random.normal(ks[3], (B, T, Hq, D), jnp.bfloat16)
    inv_freq = 1.0 / (500000.0 ** (jnp.arange(0, D, 2, dtype=jnp.float32) / D))
    ang = jnp.arange(T, dtype=jnp.float32)[None, :, None] * inv_freq
    cos, sin = jnp.cos(ang).astype(jnp.float16), jnp.sin(ang).astype(jnp.float16)
    return q, k, v, do, inv_freq, cos, sin


def stats(q, k, v, do, cos, sin):
    """o, lse [B, Hq, T] (base 2, scaled), delta [B, Hq, T] from our forward (Mosaic on sm_90)."""
    from pallas_kernels import attention_mosaic as M
    o, lse = M.mosaic_forward(q, k, v, cos, sin, scale=q.shape[-1] ** -0.5)
    delta = jnp.einsum("bthd,bthd->bht", do.astype(jnp.float32), o.astype(jnp.float32))
    return o, lse, delta


def mosaic_bwd(q, k, v, do, lse, delta, cos, sin, *, scale, fused, **kw):
    """dk, dv, dq by the fused dk/dv kernel or by the dq and dk/dv kernels."""
    from pallas_kernels import attention_mosaic_dkv, attention_mosaic_dq
    if fused:
        return attention_mosaic_dkv.mosaic_dkv(q, k, v, do, lse, delta, cos, sin, scale=scale, with_dq=True, **kw)
    dk, dv = attention_mosaic_dkv.mosaic_dkv(q, k, v, do, lse, delta, cos, sin, scale=scale, **kw)
    return dk, dv, attention_mosaic_dq.mosaic_dq(q, k, v, do, lse, delta, cos, sin, scale=scale)


def mosaic_fwd(q, k, v, do, lse, delta, cos, sin, *, scale, module="pallas_kernels.attention_mosaic", **kw):
    """The forward's output (its arguments as the backward kernels', for one timing loop)."""
    del do, lse, delta
    return importlib.import_module(module).mosaic_forward(q, k, v, cos, sin, scale=scale, **kw)[0]


def variant_fn(kernel, kw):
    """The kernel function and its launch settings; kw["module"] (popped) names another module
    holding mosaic_<kernel> (e.g. an earlier version kept beside the tree for an A/B);
    kw["tables"] = false (popped) runs it without the RoPE tables even where the others get them
    (a timing baseline: its check then fails against the rotated reference)."""
    kw = {n: tuple(x) if isinstance(x, list) else x for n, x in kw.items()}
    if kw.pop("tables", True) is False:
        fn, kw = variant_fn(kernel, kw)
        return (lambda q, k, v, do, lse, delta, cos, sin, **k_: fn(q, k, v, do, lse, delta, None, None, **k_)), kw
    if kernel in ("bwd", "fwd"):  # (fwd takes "module" itself)
        return {"bwd": mosaic_bwd, "fwd": mosaic_fwd}[kernel], kw
    mod = importlib.import_module(kw.pop("module", f"pallas_kernels.attention_mosaic_{kernel}"))
    return getattr(mod, f"mosaic_{kernel}"), kw


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kernel", choices=("dq", "dkv", "bwd", "fwd"), required=True)
    p.add_argument("--kwargs", default="{}",
                   help="JSON launch settings passed to the kernel; a list of them: variants timed in the "
                        "same process, in interleaved rounds")
    p.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds of a variant list (best median)")
    p.add_argument("--no-baseline", action="store_true", help="skip timing our Triton backward")
    p.add_argument("--no-rope", action="store_true", help="the kernel without RoPE tables (what the rotations cost)")
    p.add_argument("--with-32k", action="store_true", help="also time T = 32k (B = 1)")
    p.add_argument("--skip-2k", action="store_true", help="do not time T = 2k (the GPU checks still run)")
    a = p.parse_args()
    kws = json.loads(a.kwargs)
    kws = kws if isinstance(kws, list) else [kws]
    variants = [variant_fn(a.kernel, kw) for kw in kws]
    print(f"jax {jax.__version__} {jax.devices()[0].device_kind}", flush=True)
    dead = set()  # variants that failed to compile or run
    shapes = [(1, 256, 4, 2, True), (2, 1024, 8, 2, True)] + ([] if a.skip_2k else [(8, 2048, 32, 8, False)]) + \
        [(2, 8192, 32, 8, False)]
    for B, T, Hq, Hkv, check in shapes + ([(1, 32768, 32, 8, False)] if a.with_32k else []):
        q, k, v, do, inv_freq, cos, sin = inputs(B, T, Hq, Hkv)
        scale = q.shape[-1] ** -0.5
        if a.no_rope:  # the statistics and the reference then without RoPE as well
            cos = sin = inv_freq = None
        tables = (None, None) if a.no_rope else (cos, sin)
        o, lse, delta = jax.jit(stats)(q, k, v, do, *tables)
        fs = [jax.jit(functools.partial(lambda fn, kw, q, k, v, do, lse, delta:
                                        fn(q, k, v, do, lse, delta, *tables, scale=scale, **kw), fn, kw))
              for fn, kw in variants]
        fs = [None if i in dead else f for i, f in enumerate(fs)]
        args = (q, k, v, do, lse, delta)
        if check:
            out, vjp = jax.vjp(lambda q, k, v: flash_attention_reference(q, k, v, inv_freq=inv_freq), q, k, v)
            dq, dk, dv = vjp(do)
            want = {"dq": (dq,), "dkv": (dk, dv), "bwd": (dk, dv, dq), "fwd": (out,)}[a.kernel]
            for n, (kw, f) in enumerate(zip(kws, fs)):
                if f is None:
                    continue
                t0 = time.time()
                try:
                    got = jax.block_until_ready(f(*args))
                except Exception as e:  # noqa: BLE001 - a variant that does not compile is dropped
                    print(f"{a.kernel} {json.dumps(kw)}: {type(e).__name__}: {str(e)[:300]}", flush=True)
                    dead.add(n)
                    continue
                got = got if isinstance(got, tuple) else (got,)
                errs = [float(jnp.max(jnp.abs(g.astype(jnp.float32) - w.astype(jnp.float32))) / jnp.max(jnp.abs(w.astype(jnp.float32))))
                        for g, w in zip(got, want)]
                print(f"{a.kernel} {json.dumps(kw)} B={B} T={T} Hq/Hkv={Hq}/{Hkv}: first call {time.time() - t0:.1f}s"
                      " rel err " + " ".join(f"{e:.1e}" for e in errs) + (" PASS" if max(errs) < 2e-2 else " FAIL"),
                      flush=True)
            continue
        best = [float("inf")] * len(fs)
        for _ in range(a.rounds if len(fs) > 1 else 1):
            for i, f in enumerate(fs):
                if f is not None:
                    best[i] = min(best[i], timeit(f, *args))
        gemms = {"dq": 3, "dkv": 4, "bwd": 5, "fwd": 2}[a.kernel]  # dq: S, dP, dQ; dk/dv: S, dP, dV, dK; bwd: the 5; fwd: S, PV (causal halves)
        fl = gemms * 2 * B * Hq * T * T * 128 / 2
        lines = [f"{a.kernel} {json.dumps(kw)} B={B} T={T} Hq/Hkv={Hq}/{Hkv}: {ms:.3f} ms ({fl / ms / 1e9:.0f} TF/s)"
                 + (f", {best[0] / ms:.3f}x the first" if i and 0 not in dead else "")
                 for i, (kw, ms) in enumerate(zip(kws, best)) if i not in dead]
        if not (a.no_baseline or a.no_rope or a.kernel == "fwd"):
            triton_bwd = attn.Tuning(mosaic_dq=False, mosaic_dkv=False)  # Mosaic forward, Triton backward
            tri = jax.jit(lambda q, k, v, do: jax.vjp(
                lambda *x: attn.flash_attention(*x, inv_freq=inv_freq, tuning=triton_bwd), q, k, v)[1](do))
            fwd = jax.jit(lambda q, k, v: attn.flash_attention(q, k, v, inv_freq=inv_freq, tuning=triton_bwd))
            t_bwd = timeit(tri, q, k, v, do) - timeit(fwd, q, k, v)
            lines[0] += f"; our Triton backward (dq + dk/dv) {t_bwd:.3f} ms"
        print("\n".join(lines), flush=True)


if __name__ == "__main__":
    main()
