import sys, time, statistics, os, functools
import jax, jax.numpy as jnp
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__))); sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from proto_mosaic_attention import mosaic_forward
from pallas_kernels.attention import flash_attention, flash_attention_reference, apply_rope, rope_cos_sin

def timeit(f, *a, reps=10):
    jax.block_until_ready(f(*a)); jax.block_until_ready(f(*a)); ts = []
    for _ in range(reps):
        t = time.perf_counter(); jax.block_until_ready(f(*a)); ts.append(time.perf_counter() - t)
    return statistics.median(ts) * 1e3

for B, T in [(8, 2048), (2, 8192)]:
    Hq, Hkv, D = 32, 8, 128
    ks = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(ks[0], (B, T, Hq, D), jnp.bfloat16)
    k = jax.random.normal(ks[1], (B, T, Hkv, D), jnp.bfloat16)
    v = jax.random.normal(ks[2], (B, T, Hkv, D), jnp.bfloat16)
    inv_freq = 1.0 / (500000.0 ** (jnp.arange(0, D, 2, dtype=jnp.float32) / D))
    ang = jnp.arange(T, dtype=jnp.float32)[None, :, None] * inv_freq
    cos, sin = jnp.cos(ang).astype(jnp.float16), jnp.sin(ang).astype(jnp.float16)
    fl = 2 * 2 * B * Hq * T * T * D / 2
    ours = jax.jit(lambda q, k, v: flash_attention(q, k, v, inv_freq=inv_freq))
    t_ours = timeit(ours, q, k, v)
    pos = jnp.broadcast_to(jnp.arange(T), (B, T)); c32, s32 = rope_cos_sin(pos, inv_freq)
    qr, kr = apply_rope(q, c32, s32), apply_rope(k, c32, s32)
    cud = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn"))
    t_cud = timeit(cud, qr, kr, v)
    ref = ours(q, k, v).astype(jnp.float32)
    print(f"T={T} B={B}: triton fwd (RoPE) {t_ours:.3f} ms ({fl/t_ours/1e9:.0f} TF/s), cudnn fwd (pre-rot) {t_cud:.3f} ms", flush=True)
    for st, rot, regs in [(2, 16, None), (3, 16, None), (2, 16, (200, 104)), (2, 32, (200, 104)), (3, 16, (200, 104))]:
        try:
            f = jax.jit(functools.partial(mosaic_forward, scale=D ** -0.5, stages=st, rot_rows=rot, regs=regs))
            o, lse = f(q, k, v, cos, sin)
            err = float(jnp.max(jnp.abs(o.astype(jnp.float32) - ref)) / jnp.max(jnp.abs(ref)))
            t = timeit(f, q, k, v, cos, sin)
            print(f"  mosaic v2 stages={st} rot_rows={rot} regs={regs}: {t:.3f} ms ({fl/t/1e9:.0f} TF/s) err vs triton {err:.2e}", flush=True)
        except Exception as e:
            print(f"  mosaic v2 stages={st} rot_rows={rot} regs={regs}: {type(e).__name__}: {str(e)[:400]}", flush=True)
