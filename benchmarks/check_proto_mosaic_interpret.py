import sys, time, numpy as np, jax, jax.numpy as jnp
import os; sys.path.insert(0, os.path.dirname(os.path.abspath(__file__))); sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from proto_mosaic_attention import mosaic_forward
from pallas_kernels.attention import flash_attention_reference
interp = None
if jax.devices()[0].platform == "cpu":
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
    interp = InterpretGPUParams()
B, T, Hq, Hkv, D = (2, 256, 4, 2, 128) if interp else (2, 2048, 32, 8, 128)
ks = jax.random.split(jax.random.key(0), 3)
q = jax.random.normal(ks[0], (B, T, Hq, D), jnp.bfloat16)
k = jax.random.normal(ks[1], (B, T, Hkv, D), jnp.bfloat16)
v = jax.random.normal(ks[2], (B, T, Hkv, D), jnp.bfloat16)
inv_freq = 1.0 / (500000.0 ** (jnp.arange(0, D, 2, dtype=jnp.float32) / D))
ang = jnp.arange(T, dtype=jnp.float32)[None, :, None] * inv_freq
cos, sin = jnp.cos(ang).astype(jnp.float16), jnp.sin(ang).astype(jnp.float16)
t = time.time()
o, lse = mosaic_forward(q, k, v, cos, sin, scale=D ** -0.5, interpret=interp)
o = jax.block_until_ready(o); print("ran in", time.time() - t)
ref = flash_attention_reference(q, k, v, inv_freq=inv_freq)
err = float(jnp.max(jnp.abs(o.astype(jnp.float32) - ref.astype(jnp.float32))) / jnp.max(jnp.abs(ref.astype(jnp.float32))))
print("rel err", err, "lse finite", bool(jnp.isfinite(lse).all()))
