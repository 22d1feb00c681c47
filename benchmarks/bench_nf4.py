#!/usr/bin/env python3
"""GPU benchmark of the fused NF4 matmul (pallas_kernels/nf4_matmul.py).

Phases (all by default, in this order; each stops early when the time budget runs out):
  check  compiled kernel vs the jnp reference on the GPU, forward and dx, ragged and real shapes
  bnb    quantize_nf4(like="cuda") vs bitsandbytes' CUDA kernels, if bitsandbytes imports
  sweep  a few tile configs on one projection shape, forward and dx, small and large M
  gemv   the CUDA-core few-rows kernels (nf4_gemv) at M = 1, 2, 4 on every shape: configs against
         the MMA kernel's default and the bf16 matmul
  dequant  nf4_dequantize alone (Pallas, the many-rows path's first half): tiles and layouts
  table  Llama-3.1-8B projections (out x in) at M = 1, 16, 2048, 8192, forward and dx, against
         (a) XLA dequantize-then-matmul and (b) the plain bf16 matmul of the same shape; "pdq" is
         the Pallas dequantize + cuBLAS path nf4_linear takes, "pdq-oth" the same with the weight
         written in the other layout ([out, in] for the forward, [in, out] for dx)

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
from concurrent.futures import ThreadPoolExecutor

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import nf4_gemv as G
from pallas_kernels import nf4_matmul as K
from unsloth_jax.quant import dequantize_nf4, nf4_nbytes, quantize_nf4

SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336), (1024, 4096)]  # (out N, in K) of Llama-3.1-8B
MS = [1, 16, 2048, 8192]
L2_DEFEAT_BYTES = 160 << 20  # > 3x the H100's 50 MB L2
DOUBLE_QUANT = True  # --single-quant: fp32 absmax per block (no table lookup in the kernel)
REPEAT = 1  # --repeat: table timings taken this many times, interleaved, fastest kept
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


def op_pdq_fwd(x, q):
    return K.dequant_matmul(x, q, INTERPRET)


def op_pdq_dx(dy, q):
    # What dequant_matmul's backward runs.
    return jnp.dot(dy, K.nf4_dequantize(q, dy.dtype, interpret=INTERPRET))


def op_pdq_other_fwd(x, q):
    # The other weight layout: [out, in] as the bf16 baseline reads it (dequant_matmul writes [in, out]).
    # At 4096x4096, M = 2048 the forward (0.228 ms) ran 1.36x the dx (0.168 ms; RESULTS.md section 2).
    return jnp.dot(x, K.nf4_dequantize(q, x.dtype, interpret=INTERPRET).T)


def op_pdq_other_dx(dy, q):
    return jnp.dot(dy, K.nf4_dequantize(q, dy.dtype, transpose=True, interpret=INTERPRET).T)


def op_bf16_fwd(x, w):
    return jnp.dot(x, w.T)


def op_bf16_dx(dy, w):
    return jnp.dot(dy, w)


def compile_all(jobs, workers=None):
    """{key: (op, a_spec, w_specs)} -> {key: executable or the exception}. Each job is
    `[op(a, w) for w in ws]` in one jit. Lowering runs here, XLA/Triton compilation in parallel
    threads (it releases the GIL), so a table of ~100 executables compiles in seconds."""
    lowered, out = {}, {}
    for key, (op, a_spec, w_specs) in jobs.items():
        try:
            lowered[key] = jax.jit(lambda a, ws, op=op: [op(a, w) for w in ws]).lower(a_spec, w_specs)
        except Exception as e:  # noqa: BLE001 - a config that does not lower is reported
            out[key] = e
    with ThreadPoolExecutor(max_workers=workers or min(16, os.cpu_count() or 4)) as ex:
        futs = {key: ex.submit(low.compile) for key, low in lowered.items()}
        for key, fut in futs.items():
            try:
                out[key] = fut.result()
            except Exception as e:  # noqa: BLE001
                out[key] = e
    return out


def time_exe(exe, a, weights, rounds=5, inner=4):
    """Seconds per op of a `build` executable: calls dispatched back to back, median round / L."""
    jax.block_until_ready(exe(a, weights))
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(inner):
            out = exe(a, weights)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t0) / inner)
    return statistics.median(times) / len(weights)


# ---- data -------------------------------------------------------------------------------------

def nf4_spec(n, k):
    return jax.eval_shape(lambda w: quantize_nf4(w, record_dtype="bfloat16", double_quant=DOUBLE_QUANT),
                          jax.ShapeDtypeStruct((n, k), jnp.float32))


def make_weights(n, k, kind, copies):
    """`copies` distinct device buffers of one random weight: bf16 [n, k] or its NF4Tensor
    (distinct buffers, so that repeated ops stream from HBM rather than L2)."""
    w = jax.random.normal(jax.random.PRNGKey(n * 7 + k), (n, k), jnp.float32) * 0.02
    base = (quantize_nf4(w, record_dtype="bfloat16", double_quant=DOUBLE_QUANT) if kind == "nf4"
            else w.astype(jnp.bfloat16))
    ws = [jax.tree.map(lambda a: jnp.array(a, copy=True), base) for _ in range(copies)]
    return jax.block_until_ready(ws)


def n_copies(bytes_one, m):
    if m > 256:  # compute bound: the cache hardly matters, a few copies amortize dispatch
        return 4
    return int(min(20, max(4, math.ceil(L2_DEFEAT_BYTES / bytes_one))))


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
        (2048, 4096, 4096, jnp.bfloat16, T(256, 128, 64, 8, 3, 1, 8, "select")),
        (1, 4096, 4096, jnp.bfloat16, T(16, 64, 128, 4, 4, 8, 8, "select")),
        (3, 1000, 704, jnp.bfloat16, None),                       # CUDA-core kernels: ragged N, 11 blocks
        (1, 4096, 14336, jnp.bfloat16, G.GemvConfig(16, 8, 4, 3, 4)),  # split reduction, both kernels
        (4, 72, 128, jnp.float32, None),
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
    for i, (n, k) in enumerate([(4096, 4096), (1000, 704), (14336, 4096)]):
        # The Pallas dequantize must give dequantize_nf4's values bit for bit (same fp32 math).
        if not budget.ok(20) or (INTERPRET and n * k > 1e6):
            continue
        w = jax.random.normal(jax.random.PRNGKey(400 + i), (n, k), jnp.float32) * 0.02
        q = quantize_nf4(w)
        got = K.nf4_dequantize(q, jnp.bfloat16, interpret=INTERPRET)
        want = dequantize_nf4(q, jnp.bfloat16)
        diff = int(np.sum(np.asarray(got, np.float32) != np.asarray(want, np.float32)))
        rows.append(dict(n=n, k=k, what="nf4_dequantize bf16", mismatches=diff, ok=diff == 0))
        log(f"check {'OK  ' if diff == 0 else 'FAIL'} nf4_dequantize {n}x{k}: {diff} elements differ")
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
    """Candidates for the sweep. For dx, block_n tiles the reduction (N) and block_k the output.
    Fields: block_m, block_n, block_k, warps, stages, split (0 = auto), group, decode, weight_lhs,
    interleave."""
    T = K.TileConfig
    if direction in SWEEP_CFGS:
        return [T(*fields) for fields in SWEEP_CFGS[direction]]
    if m <= 16:
        return [T(16, 64, 128, 4, 4, 0, 8, "prmt", lhs, il) for lhs in (True, False) for il in (True, False)] + [
            T(16, 64, 128, 4, 6, 0, 8, "prmt", False, False), T(16, 32, 128, 2, 4, 0, 8, "prmt", False, False),
            T(16, 64, 128, 4, 4, 4, 8, "prmt", False, False), T(16, 32, 128, 4, 4, 0, 8, "prmt", False, True)]
    return [T(256, 128, 64, 8, 3, 1, 8, "prmt", True), T(256, 64, 64, 4, 3, 1, 8, "prmt", False),
            T(256, 64, 64, 4, 3, 1, 8, "prmt", False, False), T(256, 128, 64, 8, 3, 1, 8, "prmt", True, False),
            T(256, 128, 128, 8, 3, 1, 8, "prmt", True, False)]

SWEEP_CFGS = {}  # --sweep-cfgs: {"fwd": [[TileConfig fields...], ...], "dx": [...]} replaces sweep_configs' lists
GEMV_CFGS = {}  # --gemv-cfgs: {"fwd": [[fields...], ...], "dx": [...]} replaces the lists below


def gemv_configs(direction):
    """Candidates (block_rows, blocks, warps, stages, split, decode) for the CUDA-core kernels."""
    C = G.GemvConfig
    if direction in GEMV_CFGS:
        return [C(*fields) for fields in GEMV_CFGS[direction]]
    if INTERPRET:  # a dry run of the phase, not a sweep
        return [C(16, 2, 4, 3), C(16, 2, 4, 3, 2)]
    if direction == "fwd":  # session-4 run 1: (128, 2, 4 warps) best on 3 of 4 shapes, (32, 4, 8) next
        base = [C(128, 2, 4, 3), C(32, 4, 8, 3), C(128, 1, 4, 3), C(256, 1, 4, 3), C(256, 2, 8, 3),
                C(64, 2, 4, 3), C(64, 2, 2, 3), C(128, 2, 8, 3), C(64, 4, 8, 3)]
    else:  # run 1: (32, 4, 4 warps) best on 3 of 4, (16, 8, 4) next
        base = [C(32, 4, 4, 3), C(16, 8, 4, 3), C(32, 8, 4, 3), C(64, 4, 4, 3), C(32, 4, 8, 3),
                C(64, 2, 4, 3), C(32, 2, 2, 3), C(64, 4, 8, 3), C(128, 2, 4, 3)]
    return base + [dataclasses.replace(c, decode="prmt16") for c in base[:5]]


def phase_gemv(budget, results, shapes, ms=(1, 2, 4)):
    """Every (shape, M, direction): each CUDA-core config, the MMA kernel's default, bf16."""
    jobs = {}
    for (n, k) in shapes:
        for m in ms:
            for direction in ("fwd", "dx"):
                fwd = direction == "fwd"
                a_spec = jax.ShapeDtypeStruct((m, k if fwd else n), jnp.bfloat16)
                nf4s = [nf4_spec(n, k)] * n_copies(nf4_nbytes_est(n, k), m)
                for i, cfg in enumerate(gemv_configs(direction)):
                    jobs[(n, k, m, direction, i)] = (op_nf4_fwd(cfg) if fwd else op_nf4_dx(cfg), a_spec, nf4s)
                mma = K.default_config(m, n if fwd else k, k if fwd else n, dx=not fwd)
                jobs[(n, k, m, direction, "mma")] = (op_nf4_fwd(mma) if fwd else op_nf4_dx(mma), a_spec, nf4s)
                jobs[(n, k, m, direction, "bf16")] = (op_bf16_fwd if fwd else op_bf16_dx, a_spec,
                                                      [jax.ShapeDtypeStruct((n, k), jnp.bfloat16)] * n_copies(2 * n * k, m))
                jobs[(n, k, m, direction, "ref")] = (op_xla_dq_fwd if fwd else op_xla_dq_dx, a_spec, nf4s[:1])
    t0 = time.time()
    exes = compile_all(jobs)
    log(f"gemv: compiled {len(exes)} executables in {time.time() - t0:.1f}s")
    rows = []
    for (n, k) in shapes:
        if not budget.ok(30):
            log("gemv: budget exhausted"); break
        qs = make_weights(n, k, "nf4", n_copies(nf4_nbytes_est(n, k), 1))
        ws = make_weights(n, k, "bf16", n_copies(2 * n * k, 1))
        for m in ms:
            for direction in ("fwd", "dx"):
                fwd = direction == "fwd"
                a = rand((m, k if fwd else n), 11 + m)
                ref = exes[(n, k, m, direction, "ref")](a, qs[:1])[0]
                row = dict(m=m, n=n, k=k, dir=direction, configs=[])
                for key in ["bf16", "mma", *range(len(gemv_configs(direction)))]:
                    exe = exes[(n, k, m, direction, key)]
                    weights = ws if key == "bf16" else qs
                    try:
                        if isinstance(exe, Exception):
                            raise exe
                        copies = n_copies(2 * n * k if key == "bf16" else nf4_nbytes_est(n, k), m)
                        err = rel_err(exe(a, weights[:copies])[0], ref)
                        ms_ = time_exe(exe, a, weights[:copies]) * 1e3
                    except Exception as e:  # noqa: BLE001
                        log(f"gemv {m} {n}x{k} {direction} {key} ERROR {repr(e)[:300]}")
                        continue
                    if key in ("bf16", "mma"):
                        row[f"{key}_ms"] = ms_
                    else:
                        row["configs"].append(dict(cfg=dataclasses.asdict(gemv_configs(direction)[key]), ms=ms_,
                                                   err=err, ok=bool(err < 2e-2 or key == "bf16")))
                good = [c for c in row["configs"] if c["ok"]]
                if good:
                    best = min(good, key=lambda c: c["ms"])
                    row.update(best=best, default_ms=row["configs"][0]["ms"])
                    log(f"gemv M={m} {n:5d}x{k:<5d} {direction:3s} bf16 {row.get('bf16_ms', 0):.4f} "
                        f"mma {row.get('mma_ms', 0):.4f} gemv default {row['default_ms']:.4f} "
                        f"({row.get('bf16_ms', 0) / row['default_ms']:.2f}x bf16) best {best['ms']:.4f} "
                        f"{tuple(best['cfg'].values())[:5]} err {best['err']:.1e}; "
                        f"bad {len(row['configs']) - len(good)}")
                rows.append(row)
        del qs, ws
    results["gemv"] = rows


def nf4_nbytes_est(n, k):
    nb = n * k // 64
    return n * k // 2 + nb + 4 * (-(-nb // 256)) + 1024 + 4


def phase_sweep(budget, results, n=14336, k=4096, ms=(1, 2048)):
    """Time each candidate config (and check its output against the reference) on one shape."""
    jobs, refs = {}, {}
    for m in ms:
        for direction in ("fwd", "dx"):
            copies = n_copies(nf4_nbytes_est(n, k), m)
            a_spec = jax.ShapeDtypeStruct((m, k if direction == "fwd" else n), jnp.bfloat16)
            w_specs = [nf4_spec(n, k)] * copies
            for i, cfg in enumerate(sweep_configs(m, direction)):
                op = op_nf4_fwd(cfg) if direction == "fwd" else op_nf4_dx(cfg)
                jobs[(m, direction, i)] = (op, a_spec, w_specs)
            refs[(m, direction)] = (op_xla_dq_fwd if direction == "fwd" else op_xla_dq_dx, a_spec, w_specs[:1])
    t0 = time.time()
    exes = compile_all({**jobs, **{("ref",) + key: job for key, job in refs.items()}})
    log(f"sweep: compiled {len(exes)} executables in {time.time() - t0:.1f}s")
    rows = []
    qs = make_weights(n, k, "nf4", max(n_copies(nf4_nbytes_est(n, k), m) for m in ms))
    for m in ms:
        for direction in ("fwd", "dx"):
            copies = n_copies(nf4_nbytes_est(n, k), m)
            a = rand((m, k if direction == "fwd" else n), 7 + m)
            ref_exe = exes[("ref", m, direction)]
            ref = None if isinstance(ref_exe, Exception) else ref_exe(a, qs[:1])[0]
            for i, cfg in enumerate(sweep_configs(m, direction)):
                if not budget.ok(60):
                    log("sweep: budget exhausted"); results.setdefault("sweep", []).extend(rows); return
                exe = exes[(m, direction, i)]
                row = dict(m=m, n=n, k=k, dir=direction, cfg=dataclasses.asdict(cfg))
                try:
                    if isinstance(exe, Exception):
                        raise exe
                    err = rel_err(exe(a, qs[:copies])[0], ref) if ref is not None else float("nan")
                    row.update(ms=time_exe(exe, a, qs[:copies]) * 1e3, err=err, ok=bool(err < 2e-2))
                    log(f"sweep M={m:5d} {direction:3s} {row['ms']:8.3f} ms err={err:.1e} {cfg}")
                except Exception as e:  # noqa: BLE001
                    row["error"] = repr(e)[:300]
                    log(f"sweep M={m} {direction} ERROR {cfg}: {repr(e)[:300]}")
                rows.append(row)
    results.setdefault("sweep", []).extend(rows)


def phase_dequant(budget, results, n=14336, k=4096):
    if INTERPRET:
        n, k = 256, 512
    """nf4_dequantize alone (the first half of the many-rows path): tiles, both output layouts."""
    T = K.TileConfig
    tiles = [T(64, 32, 256, 4, 1, 1, 1), T(32, 32, 256, 4, 1, 1, 1), T(64, 32, 128, 4, 1, 1, 1),
             T(128, 32, 256, 8, 1, 1, 1), T(64, 32, 512, 8, 1, 1, 1), T(16, 32, 1024, 4, 1, 1, 1)]
    jobs = {}
    copies = n_copies(nf4_nbytes_est(n, k), 1)
    for i, t in enumerate(tiles):
        for tr in (False, True):
            op = (lambda t, tr: lambda a, q: K.nf4_dequantize(q, jnp.bfloat16, transpose=tr, interpret=INTERPRET,
                                                              tiles=t))(t, tr)
            jobs[(i, tr)] = (op, jax.ShapeDtypeStruct((1,), jnp.float32), [nf4_spec(n, k)] * copies)
    exes = compile_all(jobs)
    qs = make_weights(n, k, "nf4", copies)
    a = jnp.zeros((1,), jnp.float32)
    rows = []
    for (i, tr), exe in exes.items():
        if not budget.ok(20):
            break
        row = dict(n=n, k=k, tiles=dataclasses.asdict(tiles[i]), transpose=tr)
        if isinstance(exe, Exception):
            row["error"] = repr(exe)[:200]
        else:
            ms = time_exe(exe, a, qs) * 1e3
            row.update(ms=ms, gbs=(nf4_nbytes(qs[0]) + 2 * n * k) / ms / 1e6)
        rows.append(row)
        log(f"dequant {n}x{k} transpose={tr} {tiles[i].block_m}x{tiles[i].block_k} w{tiles[i].num_warps}: "
            f"{row.get('ms', float('nan')):.3f} ms {row.get('gbs', 0):.0f} GB/s {row.get('error', '')}")
    results["dequant"] = rows


def best_from_sweep(results):
    """{(m_class, dir): TileConfig} of the fastest correct sweep config ('small' M <= 16, 'large'):
    with several sweep shapes, the lowest geometric-mean time among configs correct on all of them."""
    times = {}  # (m_class, dir) -> {config: {(m, n, k): ms}}
    for r in results.get("sweep", []):
        key = ("small" if r["m"] <= 16 else "large", r["dir"])
        per_shape = times.setdefault(key, {}).setdefault(json.dumps(r["cfg"], sort_keys=True), {})
        per_shape[(r["m"], r["n"], r["k"])] = r["ms"] if "ms" in r and r.get("ok", False) else math.inf
    best = {}
    for key, by_cfg in times.items():
        n_shapes = max(len(v) for v in by_cfg.values())
        score = {c: statistics.geometric_mean(v.values()) for c, v in by_cfg.items()
                 if len(v) == n_shapes and math.inf not in v.values()}
        if score:
            best[key] = K.TileConfig(**json.loads(min(score, key=score.get)))
    return best


def phase_table(budget, results, shapes, ms, tuned):
    """Every (shape, M, direction): the NF4 kernel, XLA dequantize-then-matmul, plain bf16."""
    def cfg_for(m, direction):
        return tuned.get(("small" if m <= 16 else "large", direction))

    jobs = {}
    for (n, k) in shapes:
        for m in ms:
            for direction in ("fwd", "dx"):
                a_spec = jax.ShapeDtypeStruct((m, k if direction == "fwd" else n), jnp.bfloat16)
                nf4s = [nf4_spec(n, k)] * n_copies(nf4_nbytes_est(n, k), m)
                bf16s = [jax.ShapeDtypeStruct((n, k), jnp.bfloat16)] * n_copies(2 * n * k, m)
                cfg = cfg_for(m, direction)
                fwd = direction == "fwd"
                jobs[(n, k, m, direction, "nf4")] = (op_nf4_fwd(cfg) if fwd else op_nf4_dx(cfg), a_spec, nf4s)
                jobs[(n, k, m, direction, "xla_dq")] = (op_xla_dq_fwd if fwd else op_xla_dq_dx, a_spec, nf4s)
                jobs[(n, k, m, direction, "pdq")] = (op_pdq_fwd if fwd else op_pdq_dx, a_spec, nf4s)
                jobs[(n, k, m, direction, "pdq_other")] = (op_pdq_other_fwd if fwd else op_pdq_other_dx, a_spec, nf4s)
                jobs[(n, k, m, direction, "bf16")] = (op_bf16_fwd if fwd else op_bf16_dx, a_spec, bf16s)
    t0 = time.time()
    exes = compile_all(jobs)
    log(f"table: compiled {len(exes)} executables in {time.time() - t0:.1f}s")
    rows = []
    for (n, k) in shapes:
        if not budget.ok(20):
            log("table: budget exhausted"); break
        qs = make_weights(n, k, "nf4", max(n_copies(nf4_nbytes_est(n, k), m) for m in ms))
        ws = make_weights(n, k, "bf16", max(n_copies(2 * n * k, m) for m in ms))
        q_bytes = nf4_nbytes(qs[0])
        for m in ms:
            for direction in ("fwd", "dx"):
                if not budget.ok(10):
                    log("table: budget exhausted"); break
                fwd = direction == "fwd"
                out, red = (n, k) if fwd else (k, n)
                cfg = cfg_for(m, direction) or K.default_config(m, out, red, dx=not fwd)
                row = dict(m=m, n=n, k=k, dir=direction, cfg=str(cfg))
                a = rand((m, k if fwd else n), m + n + k)
                try:
                    for _ in range(REPEAT):  # interleaved repeats, fastest kept: the machine drifts
                        for method, weights in (("nf4", qs), ("pdq", qs), ("pdq_other", qs), ("xla_dq", qs), ("bf16", ws)):
                            exe = exes[(n, k, m, direction, method)]
                            if isinstance(exe, Exception):
                                raise exe
                            copies = n_copies(nf4_nbytes_est(n, k) if method != "bf16" else 2 * n * k, m)
                            t = time_exe(exe, a, weights[:copies]) * 1e3
                            row[f"{method}_ms"] = min(t, row.get(f"{method}_ms", t))
                    flops, io = 2.0 * m * n * k, 2 * m * (n + k)
                    row["nf4_tflops"] = flops / row["nf4_ms"] / 1e9
                    row["bf16_tflops"] = flops / row["bf16_ms"] / 1e9
                    row["nf4_gbs"] = (q_bytes + io) / row["nf4_ms"] / 1e6
                    row["bf16_gbs"] = (2 * n * k + io) / row["bf16_ms"] / 1e6
                    row["speedup_vs_bf16"] = row["bf16_ms"] / row["nf4_ms"]
                    row["pdq_vs_bf16"] = row["bf16_ms"] / row["pdq_ms"]
                    row["best_vs_bf16"] = row["bf16_ms"] / min(row["nf4_ms"], row["pdq_ms"])
                    row["speedup_vs_xla_dq"] = row["xla_dq_ms"] / row["nf4_ms"]
                    log(fmt_row(row))
                except Exception as e:  # noqa: BLE001
                    row["error"] = repr(e)[:300]
                    log(f"table M={m} {n}x{k} {direction} ERROR {repr(e)[:300]}")
                rows.append(row)
        del qs, ws
    results["table"] = rows


HEADER = (f"{'M':>5} {'N x K':>12} {'dir':>3} | {'fused ms':>8} {'pdq ms':>8} {'pdq-oth':>8} {'xla-dq ms':>9} {'bf16 ms':>8} | "
          f"{'nf4 TF/s':>8} {'bf16 TF/s':>9} {'nf4 GB/s':>8} {'bf16 GB/s':>9} | {'fused/bf16':>10} {'pdq/bf16':>8} "
          f"{'vs xla-dq':>9}")


def fmt_row(r):
    return (f"{r['m']:5d} {str(r['n']) + 'x' + str(r['k']):>12} {r['dir']:>3} | {r['nf4_ms']:8.3f} "
            f"{r['pdq_ms']:8.3f} {r['pdq_other_ms']:8.3f} {r['xla_dq_ms']:9.3f} {r['bf16_ms']:8.3f} | {r['nf4_tflops']:8.1f} "
            f"{r['bf16_tflops']:9.1f} {r['nf4_gbs']:8.0f} {r['bf16_gbs']:9.0f} | {r['speedup_vs_bf16']:9.2f}x "
            f"{r['pdq_vs_bf16']:7.2f}x {r['speedup_vs_xla_dq']:8.2f}x")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--phases", default="check,bnb,sweep,table")
    p.add_argument("--budget", type=float, default=280.0, help="seconds; phases stop before this")
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    p.add_argument("--ms", default=",".join(map(str, MS)))
    p.add_argument("--shapes", default=",".join(f"{n}x{k}" for n, k in SHAPES))
    p.add_argument("--sweep-shape", default="14336x4096", help="out x in; several: comma-separated")
    p.add_argument("--sweep-cfgs", default="", help='JSON {"fwd": [[TileConfig fields], ...], "dx": [...]}')
    p.add_argument("--sweep-ms", default="1,2048")
    p.add_argument("--gemv-ms", default="1,2,4")
    p.add_argument("--gemv-cfgs", default="", help='JSON {"fwd": [[GemvConfig fields], ...], "dx": [...]}')
    p.add_argument("--tuned", default="", help="JSON {'small-fwd': {TileConfig fields}, ...} to use in the table")
    p.add_argument("--interpret", action="store_true", help="CPU dry run through the Pallas interpreter")
    p.add_argument("--repeat", type=int, default=1, help="table: interleaved timing repeats, fastest kept")
    p.add_argument("--single-quant", action="store_true", help="weights without double quantization")
    args = p.parse_args()
    global INTERPRET, DOUBLE_QUANT, REPEAT
    INTERPRET = args.interpret
    REPEAT = args.repeat
    GEMV_CFGS.update(json.loads(args.gemv_cfgs) if args.gemv_cfgs else {})
    SWEEP_CFGS.update(json.loads(args.sweep_cfgs) if args.sweep_cfgs else {})
    DOUBLE_QUANT = not args.single_quant
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
    if "dequant" in phases:
        phase_dequant(budget, results); save()
    if "gemv" in phases:
        phase_gemv(budget, results, [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")],
                   [int(v) for v in args.gemv_ms.split(",")]); save()
    if "sweep" in phases:
        for shape in args.sweep_shape.split(","):
            sn, sk = (int(v) for v in shape.split("x"))
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
        # "best": what nf4_linear can dispatch to, the fused kernel or the Pallas dequantize + cuBLAS.
        small = [r["best_vs_bf16"] for r in results["table"] if "nf4_ms" in r and r["m"] <= 16]
        large = [r["best_vs_bf16"] for r in results["table"] if "nf4_ms" in r and r["m"] >= 2048]
        if small:
            log(f"targets (best of fused / pdq): M<=16 faster than bf16 in {sum(v > 1 for v in small)}/{len(small)} rows "
                f"(min {min(small):.2f}x); M>=2048 at >=0.9x bf16 in {sum(v >= 0.9 for v in large)}/{len(large)} "
                f"rows (min {min(large) if large else float('nan'):.2f}x)")
    log(f"# done, {budget.left():.0f}s of budget left")


if __name__ == "__main__":
    main()
