"""GPU runner for the Mosaic GPU attention forward (pallas_kernels/attention_mosaic.py): its launch
settings as variants. (The debug switches the kernel was bisected with, P in shared memory, no K
rotation, JAX-style barrier skipping, are in this script's and the prototype's history, 31cf9f9.)

One call is informative even if some variants hang: every variant runs in its own subprocess with
a timeout (compile included), first at a tiny shape checked against flash_attention_reference
(RoPE inside), then, only if that passes, timed at (B=8, T=2048) and (B=2, T=8192), Hq/Hkv 32/8,
D=128 bf16 next to cuDNN (pre-rotated q/k) measured in the same process. A first subprocess times
our Triton forward and cuDNN. Phase markers tell where a timeout hit (lower / compile / run).

  PYTHONPATH=$PWD python benchmarks/run_mosaic_attention.py                 # all variants, --budget 400
  PYTHONPATH=$PWD python benchmarks/run_mosaic_attention.py --only s3_regs,s2
  PYTHONPATH=$PWD python benchmarks/run_mosaic_attention.py --lower         # CPU: lower every variant for CUDA
  PYTHONPATH=$PWD python benchmarks/run_mosaic_attention.py --sanitize s3_regs --tool synccheck
"""
import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
REGS = (200, 104)  # 2*128*200 + 128*104 = 64512 = 168 * 384, the JAX FA3 kernel's total (232/40)

# The library default first (3 stages, setmaxnreg 200/104: fastest in session 4), then the others.
VARIANTS = {
    "s3_regs": dict(stages=3, regs=REGS),
    "s3": dict(stages=3, regs=None),
    "s2_regs": dict(stages=2, regs=REGS),
    "s2": dict(stages=2, regs=None),
    "s3_regs_norope": dict(stages=3, regs=REGS, rope=False),  # q/k pre-rotated outside (timing the rotation)
    # session 7, without RoPE (the default since session 6): the old launch order
    "s3_regs_norope_inorder": dict(stages=3, regs=REGS, rope=False, longest_first=False),
    # session 9: without RoPE the producer only issues copies, so FA3's (240, 24) split
    "s3_regs240_norope": dict(stages=3, regs=(240, 24), rope=False),
}
TINY = (1, 256, 4, 2, 128)
BIG = [(8, 2048, 32, 8, 128), (2, 8192, 32, 8, 128)]
TOL = 2e-2


def example_inputs(B, T, Hq, Hkv, D=128, *, rope=True, seed=0, dtype=None):
    """Random q/k/v, the float16 cos/sin tables the kernel takes, inv_freq for the reference, and
    the kernel's q/k: pre-rotated (float32 math, outside) when the kernel is run without RoPE, so
    every variant is checked against the same RoPE reference."""
    import jax
    import jax.numpy as jnp
    from pallas_kernels.attention import apply_rope, rope_cos_sin
    dtype = dtype or jnp.bfloat16
    ks = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(ks[0], (B, T, Hq, D), dtype)
    k = jax.random.normal(ks[1], (B, T, Hkv, D), dtype)
    v = jax.random.normal(ks[2], (B, T, Hkv, D), dtype)
    inv_freq = 1.0 / (500000.0 ** (jnp.arange(0, D, 2, dtype=jnp.float32) / D))
    ang = jnp.arange(T, dtype=jnp.float32)[None, :, None] * inv_freq
    cos, sin = jnp.cos(ang).astype(jnp.float16), jnp.sin(ang).astype(jnp.float16)
    c32, s32 = rope_cos_sin(jnp.broadcast_to(jnp.arange(T), (1, T)), inv_freq)
    x = dict(q=q, k=k, v=v, cos=cos, sin=sin, inv_freq=inv_freq, rope=rope)
    if not rope:
        x.update(q_in=apply_rope(q, c32, s32), k_in=apply_rope(k, c32, s32))
    return x


def kernel_args(x):
    if x["rope"]:
        return (x["q"], x["k"], x["v"], x["cos"], x["sin"])
    return (x["q_in"], x["k_in"], x["v"])


def launch(kw):
    """The variant's keyword arguments of mosaic_forward (rope is decided by the arguments)."""
    return {key: val for key, val in kw.items() if key != "rope"}


# ----------------------------------------------------------------------------------------- child
def _phase(msg):
    print(f"PHASE {time.time():.2f} {msg}", flush=True)


def _result(**kw):
    print("RESULT " + json.dumps(kw), flush=True)


def _timeit(f, *a, reps=10):
    import statistics
    import jax
    jax.block_until_ready(f(*a)); jax.block_until_ready(f(*a))
    ts = []
    for _ in range(reps):
        t = time.perf_counter(); jax.block_until_ready(f(*a)); ts.append(time.perf_counter() - t)
    return statistics.median(ts) * 1e3


def _flops(B, T, Hq, D):
    return 4 * B * Hq * T * T * D / 2  # causal: half of QK^T + PV


def _gpu_or_none():
    import jax
    try:
        return jax.devices("gpu")
    except RuntimeError:
        return None


def child_baseline():
    _phase("start baseline")
    if not _gpu_or_none():
        return _result(status="err", msg="no GPU backend")
    import jax
    import jax.numpy as jnp
    from pallas_kernels.attention import apply_rope, flash_attention, rope_cos_sin
    out = {}
    for B, T, Hq, Hkv, D in BIG:
        x = example_inputs(B, T, Hq, Hkv, D)
        inv_freq = x["inv_freq"]
        tri = jax.jit(lambda q, k, v: flash_attention(q, k, v, inv_freq=inv_freq))
        t_tri = _timeit(tri, x["q"], x["k"], x["v"])
        _phase(f"triton T={T} {t_tri:.3f}")
        c32, s32 = rope_cos_sin(jnp.broadcast_to(jnp.arange(T), (B, T)), inv_freq)
        qr, kr = apply_rope(x["q"], c32, s32), apply_rope(x["k"], c32, s32)
        cud = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn"))
        t_cud = _timeit(cud, qr, kr, x["v"])
        _phase(f"cudnn T={T} {t_cud:.3f}")
        out[str(T)] = dict(triton=t_tri, cudnn=t_cud, tf_triton=_flops(B, T, Hq, D) / t_tri / 1e9,
                           tf_cudnn=_flops(B, T, Hq, D) / t_cud / 1e9)
    _result(status="ok", times=out, device=str(jax.devices()[0].device_kind), jax=jax.__version__)


def child_variant(name, tiny_only=False, lower_only=False):
    import functools
    import jax
    import jax.numpy as jnp
    from pallas_kernels.attention import apply_rope, flash_attention_reference, rope_cos_sin
    from pallas_kernels.attention_mosaic import mosaic_forward
    kw = VARIANTS[name]
    _phase(f"start {name} {kw}")
    if lower_only:  # CPU: lower for CUDA only (Mosaic GPU lowering runs in Python; no compile)
        x = example_inputs(*TINY, rope=kw.get("rope", True))
        f = jax.jit(functools.partial(mosaic_forward, scale=TINY[-1] ** -0.5, **launch(kw)))
        f.trace(*kernel_args(x)).lower(lowering_platforms=("cuda",))
        return _result(status="ok", msg="lowers for cuda")
    if not _gpu_or_none():
        return _result(status="err", msg="no GPU backend")
    res = dict(status="ok")
    B, T, Hq, Hkv, D = TINY
    x = example_inputs(B, T, Hq, Hkv, D, rope=kw.get("rope", True))
    f = jax.jit(functools.partial(mosaic_forward, scale=D ** -0.5, **launch(kw)))
    args = kernel_args(x)
    lowered = f.trace(*args).lower(); _phase("lowered tiny")
    compiled = lowered.compile(); _phase("compiled tiny")
    o, lse = jax.block_until_ready(compiled(*args)); _phase("ran tiny")
    ref = flash_attention_reference(x["q"], x["k"], x["v"], inv_freq=x["inv_freq"]).astype(jnp.float32)
    err = float(jnp.max(jnp.abs(o.astype(jnp.float32) - ref)) / jnp.max(jnp.abs(ref)))
    res["err"] = err
    res["lse_finite"] = bool(jnp.isfinite(lse).all())
    if not (err < TOL and res["lse_finite"]):
        return _result(status="wrong", **{k: v for k, v in res.items() if k != "status"})
    if tiny_only:
        return _result(**res)
    for B, T, Hq, Hkv, D in BIG:
        x = example_inputs(B, T, Hq, Hkv, D, rope=kw.get("rope", True))
        args = kernel_args(x)
        f = jax.jit(functools.partial(mosaic_forward, scale=D ** -0.5, **launch(kw)))
        t = _timeit(f, *args)
        _phase(f"timed T={T} {t:.3f}")
        c32, s32 = rope_cos_sin(jnp.broadcast_to(jnp.arange(T), (B, T)), x["inv_freq"])
        qr, kr = apply_rope(x["q"], c32, s32), apply_rope(x["k"], c32, s32)
        cud = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn"))
        t_cud = _timeit(cud, qr, kr, x["v"])
        o_c = cud(qr, kr, x["v"]).astype(jnp.float32)
        o_m = f(*args)[0].astype(jnp.float32)
        e_big = float(jnp.max(jnp.abs(o_m - o_c)) / jnp.max(jnp.abs(o_c)))
        res[str(T)] = dict(ms=t, tf=_flops(B, T, Hq, D) / t / 1e9, cudnn=t_cud, err_vs_cudnn=e_big)
    _result(**res)


# ---------------------------------------------------------------------------------------- parent
def _run_child(argv, timeout, env_extra=None, prefix=()):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([ROOT, HERE] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.6")
    env.update(env_extra or {})
    cmd = list(prefix) + [sys.executable, "-u", os.path.abspath(__file__), "--child"] + argv
    with tempfile.TemporaryFile(mode="w+") as log:
        t0 = time.time()
        p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            p.wait(timeout=max(timeout, 1))
            timed_out = False
        except subprocess.TimeoutExpired:
            timed_out = True
            try:
                os.killpg(p.pid, signal.SIGKILL)  # the child's own session: it and its children
            except ProcessLookupError:
                pass
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        wall = time.time() - t0
        log.seek(0)
        text = log.read()
    return text, timed_out, p.returncode, wall


def _parse(text):
    res, phases = None, []
    for line in text.splitlines():
        if line.startswith("RESULT "):
            res = json.loads(line[7:])
        elif line.startswith("PHASE "):
            phases.append(line.split(" ", 2)[2])
    ptxas = [ln.strip() for ln in text.splitlines()
             if re.search(r"ptxas info\s*: Used|spill stores|setmaxnreg|ptxas (warning|error)", ln)]
    return res, phases, ptxas


def _last_error(text, n=300):
    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.startswith(("PHASE", "RESULT"))]
    for ln in reversed(lines):
        if re.search(r"Error|error|Exception|Failed|failed", ln):
            return ln.strip()[:n]
    return (lines[-1].strip()[:n] if lines else "")


def _fmt_variant(name, text, timed_out, rc, wall):
    res, phases, ptxas = _parse(text)
    if timed_out:
        status, err = "timeout", None
        where = f"after '{phases[-1]}'" if phases else "before start"
        detail = f"{where} ({wall:.0f}s)"
    elif res is None:
        status, err, detail = "err", None, f"rc={rc}: {_last_error(text)}"
    else:
        status, err = res["status"], res.get("err")
        detail = res.get("msg", "")
    cells = [f"{name:<22}", f"{status:<7}", f"err {err:.1e}" if err is not None else "err    -  "]
    if res and res.get("status") == "ok":
        for B, T, *_ in BIG:
            r = res.get(str(T))
            if r:
                cells.append(f"T={T}: {r['ms']:.3f} ms {r['tf']:.0f} TF/s (cudnn {r['cudnn']:.3f}, d {r['err_vs_cudnn']:.1e})")
    if detail:
        cells.append(detail)
    line = " | ".join(cells)
    regs = [p for p in ptxas if "Used" in p or "spill" in p]
    if regs:
        line += "\n    ptxas: " + " ; ".join(dict.fromkeys(regs))[:400]
    return line


def _find_sanitizer():
    for c in [shutil.which("compute-sanitizer"), "/usr/local/cuda/bin/compute-sanitizer",
              *[f"/usr/local/cuda-{v}/bin/compute-sanitizer" for v in ("13.0", "12.9", "12.8", "12.6", "12.4")]]:
        if c and os.path.exists(c):
            return c
    return None


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget", type=float, default=400, help="seconds for the whole script (default 400)")
    ap.add_argument("--timeout", type=float, default=60, help="seconds per variant subprocess, compile included")
    ap.add_argument("--only", default="", help="comma-separated variant names (default: all, in order)")
    ap.add_argument("--tiny-only", action="store_true", help="correctness at the tiny shape only, no timing")
    ap.add_argument("--no-baseline", action="store_true", help="skip the Triton/cuDNN baseline subprocess")
    ap.add_argument("--no-ptxas", action="store_true", help="do not set MOSAIC_GPU_DUMP_PTXAS=1 (register/spill info)")
    ap.add_argument("--dump", default="", help="dir: MOSAIC_GPU_DUMP_{PTX,SASS} of each variant into DIR/<variant>")
    ap.add_argument("--lower", action="store_true", help="CPU: only lower each variant for CUDA (no GPU needed)")
    ap.add_argument("--sanitize", default="", metavar="VARIANT", help="run VARIANT's tiny shape under compute-sanitizer")
    ap.add_argument("--tool", default="synccheck", choices=["synccheck", "racecheck", "memcheck", "initcheck"])
    ap.add_argument("--list", action="store_true", help="list the variants and exit")
    ap.add_argument("--child", nargs="*", help=argparse.SUPPRESS)
    a = ap.parse_args()

    if a.child is not None:
        sys.path[:0] = [ROOT, HERE]
        kind, *rest = a.child
        try:
            if kind == "baseline":
                child_baseline()
            else:
                child_variant(kind, tiny_only="tiny" in rest, lower_only="lower" in rest)
        except Exception as e:  # noqa: BLE001
            msg = f"{type(e).__name__}: {str(e)[:600]}"
            print(msg, flush=True)
            _result(status="err", msg=msg.replace("\n", " ")[:600])
        return

    if a.list:
        for n, kw in VARIANTS.items():
            print(f"{n:<24} {kw}")
        return
    names = [n for n in a.only.split(",") if n] or list(VARIANTS)
    bad = [n for n in names if n not in VARIANTS]
    if bad:
        sys.exit(f"unknown variants {bad}; --list shows them")
    t_start = time.time()
    left = lambda: a.budget - (time.time() - t_start)  # noqa: E731

    if a.sanitize:
        san = _find_sanitizer()
        if not san:
            print("compute-sanitizer not found (PATH, /usr/local/cuda*/bin)")
            return
        env = {"XLA_FLAGS": (os.environ.get("XLA_FLAGS", "") + " --xla_gpu_enable_command_buffer=").strip()}
        prefix = [san, "--tool", a.tool, "--print-limit", "20"]
        text, to, rc, wall = _run_child([a.sanitize, "tiny"], min(max(a.timeout, 240), left()), env, prefix)
        print("\n".join(ln for ln in text.splitlines()
                        if "=========" in ln or ln.startswith(("RESULT", "PHASE")))[-6000:])
        print(_fmt_variant(a.sanitize + f"[{a.tool}]", text, to, rc, wall))
        return

    if a.lower:
        for n in names:
            text, to, rc, wall = _run_child([n, "lower"], min(a.timeout * 3, left()), {"JAX_PLATFORMS": "cpu"})
            print(_fmt_variant(n, text, to, rc, wall), flush=True)
        return

    env = {} if a.no_ptxas else {"MOSAIC_GPU_DUMP_PTXAS": "1"}
    if not a.no_baseline:
        text, to, rc, wall = _run_child(["baseline"], min(a.timeout * 1.5, left()))
        res, phases, _ = _parse(text)
        if res and res["status"] == "ok":
            print(f"device {res['device']}, jax {res['jax']}")
            for T, r in res["times"].items():
                print(f"baseline T={T}: triton fwd (RoPE inside) {r['triton']:.3f} ms {r['tf_triton']:.0f} TF/s | "
                      f"cudnn fwd (pre-rotated) {r['cudnn']:.3f} ms {r['tf_cudnn']:.0f} TF/s", flush=True)
        else:
            msg = res["msg"] if res else ("timeout" if to else _last_error(text))
            print(f"baseline: {msg}", flush=True)
            if res and "no GPU" in res.get("msg", ""):
                print("no GPU here: nothing to run (use --lower to check the CUDA lowering on the CPU)")
                return
    for n in names:
        if left() < 15:
            print(f"{n:<22} | skipped (budget)", flush=True)
            continue
        e = dict(env)
        if a.dump:
            d = os.path.abspath(os.path.join(a.dump, n)); os.makedirs(d, exist_ok=True)
            e.update(MOSAIC_GPU_DUMP_PTX="1", MOSAIC_GPU_DUMP_SASS="1", MOSAIC_GPU_DUMP_TO=d)
        argv = [n] + (["tiny"] if a.tiny_only else [])
        text, to, rc, wall = _run_child(argv, min(a.timeout, left() - 5), e)
        print(_fmt_variant(n, text, to, rc, wall), flush=True)
    print(f"total {time.time() - t_start:.0f} s")


if __name__ == "__main__":
    main()
