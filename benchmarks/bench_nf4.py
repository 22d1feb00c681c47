#!/usr/bin/env python3
"""GPU benchmark of the fused NF4 matmul (pallas_kernels/nf4_matmul.py).

Phases (all by default, in this order; each stops early when the time budget runs out):
  check  compiled kernel vs the jnp reference on the GPU, forward and dx, ragged and real shapes
  bnb    quantize_nf4(like="cuda") vs bitsandbytes' CUDA kernels, if bitsandbytes imports
  sweep  a few tile configs on one projection shape, forward and dx, small and large M
  table  Llama-3.1-8B projections (out x in) at M = 1, 16, 2048, 8192, forward and dx, against
         (a) XLA dequantize-then-matmul and (b) the plain bf16 matmul of the same shape

Timing: every op runs over L distinct weight buffers inside one jit (L large enough that the
weights do not fit in L2), calls are dispatched back to back and the median round is divided by
L. Inputs are random (never zeros).

    PYTHONPATH=$PWD python3 benchmarks/bench_nf4.py --out $OUT [--phases check,table] [--budget 280]
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import statistics
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import nf4_matmul as K
from unsloth_jax.quant import dequantize_nf4, nf4_nbytes, quantize_nf4

SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336), (1024, 4096)]  # (out N, in K) of Llama-3.1-8B
MS = [1, 16, 2048, 8192]
L2_DEFEAT_BYTES = 256 << 20
INTERPRET = False  # --interpret: a CPU dry run of this script (tiny shapes), not a benchmark


class Budget:
    def __init__(self, seconds):
        self.end = time.time() + seconds

    def left(self):
        return self.end - time.time()

    def ok(self, need=5.0):
        return self.left() > need


def log(*a):
    print(*a, flush=True)


def rel_err(a, b):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


# ---- ops timed ---------------------------------------------------------------------------------

def op_nf4_fwd(cfg):
    return lambda x, q: K.nf4_matmul(x, q, interpret=INTERPRET, fwd_config=cfg)


def op_nf4_dx(cfg):
    # What the custom_vjp's backward runs (the public path also recomputes the forward).
    return lambda dy, q: K._backward_dx(dy, q, INTERPRET, cfg, dy.dtype)


def op_xla_dq_fwd(x, q):
    return jnp.dot(x, dequantize_nf4(q, x.dtype).T)


def op_xla_dq_dx(dy, q):
    return jnp.dot(dy, dequantize_nf4(q, dy.dtype))


def op_bf16_fwd(x, w):
    return jnp.dot(x, w.T)


def op_bf16_dx(dy, w):
    return jnp.dot(dy, w)


def time_op(op, a, weights, rounds=5, inner=4):
    """Seconds per op: `op(a, w)` for every w in `weights` inside one jit, median over rounds."""
    run = jax.jit(lambda a, ws: [op(a, w) for w in ws])
    jax.block_until_ready(run(a, weights))
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(inner):
            out = run(a, weights)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t0) / inner)
    return statistics.median(times) / len(weights)


# ---- data -------------------------------------------------------------------------------------

_CACHE = {}


def weights_for(n, k, kind, copies):
    """`copies` distinct device buffers of one random weight: bf16 [n, k] or its NF4Tensor."""
    key = (n, k, kind, copies)
    if key not in _CACHE:
        _CACHE.clear()  # keep at most one shape's copies on the device
        w = jax.random.normal(jax.random.PRNGKey(n * 7 + k), (n, k), jnp.float32) * 0.02
        base = quantize_nf4(w, record_dtype="bfloat16") if kind == "nf4" else w.astype(jnp.bfloat16)
        _CACHE[key] = [jax.tree.map(lambda a: jnp.array(a, copy=True), base) for _ in range(copies)]
        jax.block_until_ready(_CACHE[key])
    return _CACHE[key]


def n_copies(bytes_one, m):
    if m > 256:  # compute bound: the cache hardly matters, a few copies amortize dispatch
        return 4
    return int(min(32, max(4, math.ceil(L2_DEFEAT_BYTES / bytes_one))))


def rand(shape, seed, dtype=jnp.bfloat16):
    return jax.random.normal(jax.random.PRNGKey(seed), shape, jnp.float32).astype(dtype)


# ---- phases -------------------------------------------------------------------------------------

def phase_check(budget, results):
    """Compiled kernel vs reference (fp32 products in the reference), forward and dx."""
    T = K.TileConfig
    cases = [
        (1, 4096, 4096, jnp.bfloat16, None),
        (16, 1024, 4096, jnp.bfloat16, None),
        (300, 1000, 704, jnp.bfloat16, None),                     # ragged M, N; K % 128 != 0
        (2048, 4096, 4096, jnp.bfloat16, None),
        (2048, 4096, 4096, jnp.bfloat16, T(128, 128, 64, 8, 3, 1, 8, "gather")),
        (1, 4096, 4096, jnp.bfloat16, T(16, 64, 128, 4, 4, 8, 8, "gather")),
        (37, 72, 96, jnp.float32, None),                          # K % 64 != 0: flat decode path
        (64, 256, 512, jnp.float32, None),
    ]
    if INTERPRET:
        cases = [c for c in cases if c[0] * c[1] * c[2] <= 2e6]
    rows = []
    for i, (m, n, k, dtype, cfg) in enumerate(cases):
        if not budget.ok(20):
            log("check: budget exhausted"); break
        try:
            w = jax.random.normal(jax.random.PRNGKey(100 + i), (n, k), jnp.float32) * 0.02
            q = quantize_nf4(w)
            x, dy = rand((m, k), 200 + i, dtype), rand((m, n), 300 + i, dtype)
            y, vjp = jax.vjp(lambda a: K.nf4_matmul(a, q, interpret=INTERPRET, fwd_config=cfg,
                                                     dx_config=cfg), x)
            (dx,) = vjp(dy)
            with jax.default_matmul_precision("highest"):
                y_ref, vjp_ref = jax.vjp(lambda a: K.nf4_matmul_reference(a, q), x)
                (dx_ref,) = vjp_ref(dy)
            ey, edx = rel_err(y, y_ref), rel_err(dx, dx_ref)
            finite = bool(np.isfinite(np.asarray(y, np.float32)).all() and np.isfinite(np.asarray(dx, np.float32)).all())
            tol = 2e-2 if dtype == jnp.bfloat16 else 1e-4
            ok = finite and ey < tol and edx < tol
            rows.append(dict(m=m, n=n, k=k, dtype=jnp.dtype(dtype).name, cfg=str(cfg), err_y=ey, err_dx=edx, ok=ok))
            log(f"check {'OK  ' if ok else 'FAIL'} M={m} N={n} K={k} {jnp.dtype(dtype).name:8s} "
                f"rel_err y={ey:.2e} dx={edx:.2e} cfg={cfg or 'default'}")
        except Exception as e:  # noqa: BLE001 - report and go on
            rows.append(dict(m=m, n=n, k=k, error=repr(e)))
            log(f"check ERROR M={m} N={n} K={k}: {e!r}"); traceback.print_exc()
    results["check"] = rows


def phase_bnb(budget, results):
    """Our like='cuda' quantizer vs bitsandbytes' CUDA kernels (the maker of published checkpoints)."""
    try:
        import torch
        import bitsandbytes.functional as F
    except Exception as e:  # noqa: BLE001
        log(f"bnb: not available ({e!r}); skipped"); results["bnb"] = "skipped"; return
    from unsloth_jax import quant as Q
    rows = []
    for i, (n, k) in enumerate([(4096, 4096), (1000, 704), (3, 21), (14336, 4096)]):
        if not budget.ok(15):
            break
        w = np.random.default_rng(i).standard_normal((n, k)).astype(np.float32) * 0.02
        w[0, :64] = 0.0
        wt = torch.from_numpy(w).cuda().to(torch.bfloat16)
        packed, st = F.quantize_4bit(wt, blocksize=64, quant_type="nf4", compress_statistics=True)
        ours = quantize_nf4(jnp.asarray(wt.float().cpu().numpy()).astype(jnp.bfloat16), like="cuda")
        _, absmax = Q._nf4_codes(jnp.asarray(wt.float().cpu().numpy()), 64, "cuda")
        off = np.float32(st.offset.item())
        qabs, scale, _ = Q._double_quantize(absmax, "cuda", offset=off)
        row = dict(n=n, k=k,
                   packed=bool(np.array_equal(np.asarray(ours.packed), packed.cpu().numpy().reshape(-1))),
                   offset_ulps=float(abs(np.float32(ours.offset) - off) / np.spacing(off)),
                   absmax_codes=bool(np.array_equal(np.asarray(qabs), st.absmax.cpu().numpy())),
                   nested_scale=bool(np.array_equal(np.asarray(scale), st.state2.absmax.cpu().numpy())),
                   nested_map=bool(np.array_equal(np.asarray(ours.nested_code), st.state2.code.cpu().numpy())))
        loaded = Q.from_bnb_tensors("m", {("m.weight" if kk == "weight" else f"m.weight.{kk}"): v.cpu().numpy()
                                          for kk, v in {"weight": packed, **st.as_dict(packed=True)}.items()})
        ref = F.dequantize_4bit(packed, st).float().cpu().numpy()
        row["dequant_equal"] = bool(np.array_equal(np.asarray(dequantize_nf4(loaded, jnp.bfloat16), np.float32), ref))
        rows.append(row)
        log("bnb", row)
    results["bnb"] = rows


def sweep_configs(m, direction):
    """Candidates for the sweep. For dx, block_n tiles the reduction (N) and block_k the output."""
    T = K.TileConfig
    if m <= 16:
        return [T(16, 64, 128, 4, 4, 0, 8, "gather", True), T(16, 64, 128, 4, 4, 0, 8, "select", True),
                T(16, 128, 128, 4, 4, 0, 8, "gather", True), T(16, 64, 256, 4, 3, 0, 8, "gather", True),
                T(16, 128, 256, 8, 3, 0, 8, "gather", True), T(16, 64, 128, 4, 4, 0, 8, "gather", False)]
    return [T(128, 128, 64, 8, 3, 1, 8, "gather", True), T(128, 128, 64, 8, 3, 1, 8, "select", True),
            T(128, 128, 64, 8, 3, 1, 8, "gather", False), T(128, 256, 64, 8, 3, 1, 8, "gather", True),
            T(256, 128, 64, 8, 3, 1, 8, "gather", True), T(128, 128, 128, 8, 3, 1, 8, "gather", True),
            T(64, 128, 64, 4, 4, 1, 8, "gather", True)]


def nf4_nbytes_est(n, k):
    nb = n * k // 64
    return n * k // 2 + nb + 4 * (-(-nb // 256)) + 1024 + 4


def best_from_sweep(results):
    """{(m_class, dir): TileConfig} of the fastest sweep entry, m_class 'small' (<=16) or 'large'."""
    best = {}
    for r in results.get("sweep", []):
        if "ms" not in r:
            continue
        key = ("small" if r["m"] <= 16 else "large", r["dir"])
        if key not in best or r["ms"] < best[key][0]:
            best[key] = (r["ms"], K.TileConfig(**r["cfg"]))
    return {k: v[1] for k, v in best.items()}


def phase_table(budget, results, shapes, ms, tuned):
    rows = []
    for m in ms:
        for (n, k) in shapes:
            for direction in ("fwd", "dx"):
                if not budget.ok(30):
                    log("table: budget exhausted"); results["table"] = rows; return
                out, red = (n, k) if direction == "fwd" else (k, n)
                cfg = tuned.get(("small" if m <= 16 else "large", direction))
                a = rand((m, k if direction == "fwd" else n), m + n + k)
                row = dict(m=m, n=n, k=k, dir=direction, cfg=str(cfg or K.default_config(m, out, red)))
                try:
                    qs = weights_for(n, k, "nf4", n_copies(nf4_nbytes_est(n, k), m))
                    nf4_op = op_nf4_fwd(cfg) if direction == "fwd" else op_nf4_dx(cfg)
                    row["nf4_ms"] = time_op(nf4_op, a, qs) * 1e3
                    row["xla_dq_ms"] = time_op(op_xla_dq_fwd if direction == "fwd" else op_xla_dq_dx, a, qs) * 1e3
                    q_bytes = nf4_nbytes(qs[0])
                    del qs
                    ws = weights_for(n, k, "bf16", n_copies(2 * n * k, m))
                    row["bf16_ms"] = time_op(op_bf16_fwd if direction == "fwd" else op_bf16_dx, a, ws) * 1e3
                    del ws
                    _CACHE.clear()
                    flops = 2.0 * m * n * k
                    io = 2 * m * (n + k)
                    row["nf4_tflops"] = flops / row["nf4_ms"] / 1e9
                    row["bf16_tflops"] = flops / row["bf16_ms"] / 1e9
                    row["nf4_gbs"] = (q_bytes + io) / row["nf4_ms"] / 1e6
                    row["bf16_gbs"] = (2 * n * k + io) / row["bf16_ms"] / 1e6
                    row["speedup_vs_bf16"] = row["bf16_ms"] / row["nf4_ms"]
                    row["speedup_vs_xla_dq"] = row["xla_dq_ms"] / row["nf4_ms"]
                    log(fmt_row(row))
                except Exception as e:  # noqa: BLE001
                    row["error"] = repr(e)[:300]
                    log(f"table M={m} {n}x{k} {direction} ERROR {repr(e)[:300]}")
                    _CACHE.clear()
                rows.append(row)
    results["table"] = rows


HEADER = (f"{'M':>5} {'N x K':>12} {'dir':>3} | {'nf4 ms':>8} {'xla-dq ms':>9} {'bf16 ms':>8} | "
          f"{'nf4 TF/s':>8} {'bf16 TF/s':>9} {'nf4 GB/s':>8} {'bf16 GB/s':>9} | {'vs bf16':>7} {'vs xla-dq':>9}")


def fmt_row(r):
    return (f"{r['m']:5d} {str(r['n']) + 'x' + str(r['k']):>12} {r['dir']:>3} | {r['nf4_ms']:8.3f} "
            f"{r['xla_dq_ms']:9.3f} {r['bf16_ms']:8.3f} | {r['nf4_tflops']:8.1f} {r['bf16_tflops']:9.1f} "
            f"{r['nf4_gbs']:8.0f} {r['bf16_gbs']:9.0f} | {r['speedup_vs_bf16']:6.2f}x {r['speedup_vs_xla_dq']:8.2f}x")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--phases", default="check,bnb,sweep,table")
    p.add_argument("--budget", type=float, default=280.0, help="seconds; phases stop before this")
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    p.add_argument("--ms", default=",".join(map(str, MS)))
    p.add_argument("--shapes", default=",".join(f"{n}x{k}" for n, k in SHAPES))
    p.add_argument("--sweep-shape", default="14336x4096")
    p.add_argument("--sweep-ms", default="1,2048")
    p.add_argument("--tuned", default="", help="JSON {'small-fwd': {TileConfig fields}, ...} to use in the table")
    p.add_argument("--interpret", action="store_true", help="CPU dry run through the Pallas interpreter")
    args = p.parse_args()
    global INTERPRET
    INTERPRET = args.interpret
    budget = Budget(args.budget)
    phases = args.phases.split(",")
    dev = jax.devices()[0]
    results = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                   jax=jax.__version__, device=dev.device_kind, platform=dev.platform,
                   sms=getattr(dev, "core_count", None), command=" ".join(sys.argv))
    log(f"# {results['date']} jax {jax.__version__} on {dev.device_kind} ({dev.platform}, "
        f"{results['sms']} SMs); {results['command']}")

    def save():
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "bench_nf4.json"), "w") as f:
            json.dump(results, f, indent=1, default=str)

    if "check" in phases:
        phase_check(budget, results); save()
    if "bnb" in phases:
        phase_bnb(budget, results); save()
    if "sweep" in phases:
        sn, sk = (int(v) for v in args.sweep_shape.split("x"))
        phase_sweep(budget, results, sn, sk, [int(v) for v in args.sweep_ms.split(",")]); save()
    tuned = best_from_sweep(results)
    if args.tuned:
        for key, fields in json.loads(args.tuned).items():
            size, direction = key.split("-")
            tuned[(size, direction)] = K.TileConfig(**fields)
    results["tuned"] = {f"{a}-{b}": dataclasses.asdict(c) for (a, b), c in tuned.items()}
    if tuned:
        log("tuned configs:", results["tuned"])
    if "table" in phases:
        shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
        ms = [int(v) for v in args.ms.split(",")]
        log(HEADER)
        phase_table(budget, results, shapes, ms, tuned)
        save()
        log("\n" + HEADER)
        for r in results["table"]:
            if "nf4_ms" in r:
                log(fmt_row(r))
    log(f"# done, {budget.left():.0f}s of budget left")


if __name__ == "__main__":
    main()
