"""CPU check of benchmarks/proto_mosaic_attention.py under the Mosaic GPU interpreter.
Usage: python benchmarks/check_proto_mosaic_interpret.py [flag=value ...]
(e.g. rotate_k=False reuse_q_smem=True stages=3; values are Python literals). skip_waits=False is
GPU-only: the interpreter requires every barrier phase to be observed by every waiting thread."""
import ast, os, sys, time
# The interpreter runs the 3 warpgroups as 3 threads whose barrier waits block inside XLA CPU
# callbacks; on a 2-core machine XLA's CPU pool has 2 threads and the third warpgroup never starts
# (a deadlock of the interpreter, not of the kernel: seen with stages=3). NPROC sizes that pool.
os.environ.setdefault("NPROC", "8")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__))); sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import jax, jax.numpy as jnp
from proto_mosaic_attention import mosaic_forward, example_inputs
from pallas_kernels.attention import flash_attention_reference

flags = {a.split("=", 1)[0]: ast.literal_eval(a.split("=", 1)[1]) for a in sys.argv[1:]}
interp = None
if jax.devices()[0].platform == "cpu":
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
    interp = InterpretGPUParams()
B, T, Hq, Hkv, D = (2, 256, 4, 2, 128) if interp else (2, 2048, 32, 8, 128)
x = example_inputs(B, T, Hq, Hkv, D, rotate_q=flags.get("rotate_q", True), rotate_k=flags.get("rotate_k", True))
t = time.time()
o, lse = mosaic_forward(x["q_in"], x["k_in"], x["v"], x["cos"], x["sin"], scale=D ** -0.5, interpret=interp, **flags)
o = jax.block_until_ready(o); print("ran in", time.time() - t)
ref = flash_attention_reference(x["q"], x["k"], x["v"], inv_freq=x["inv_freq"])
err = float(jnp.max(jnp.abs(o.astype(jnp.float32) - ref.astype(jnp.float32))) / jnp.max(jnp.abs(ref.astype(jnp.float32))))
ok = err < 2e-2 and bool(jnp.isfinite(lse).all())
print(flags, "rel err", err, "lse finite", bool(jnp.isfinite(lse).all()), "PASS" if ok else "FAIL")
sys.exit(0 if ok else 1)
