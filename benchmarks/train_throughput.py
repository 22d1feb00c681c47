"""LoRA training throughput on Llama shapes (random weights and tokens), one config per process.

    python benchmarks/train_throughput.py --matrix            # every shape x policy, prints a table
    python benchmarks/train_throughput.py --shape llama-8b --policy full --batch 2   # one RESULT line

Same setup as ../shared/bench (seq 2048, LoRA r=16 alpha=16 on all 7 projections, AdamW, bf16).
MFU counts model FLOPs only: 4N per token for frozen-weight LoRA (forward 2N + input-gradient 2N,
N = parameters in matmuls incl. lm_head) + attention (causal), over the bf16 matmul rate measured
in the same process (8192^3).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192, "rope_theta": 500000.0}
SHAPES = {
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True, head_dim=64,
                     rope_parameters=LLAMA3_ROPE),
    "llama-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False, head_dim=128,
                     rope_parameters=dict(LLAMA3_ROPE, factor=8.0)),
}
DEFAULT_BATCH = {"llama-1b": 4, "llama-8b": 2}


def matmul_tflops():
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.PRNGKey(0), (8192, 8192), jnp.bfloat16)
    b = jax.random.normal(jax.random.PRNGKey(1), (8192, 8192), jnp.bfloat16)
    f = jax.jit(lambda a, b: a @ b)
    f(a, b).block_until_ready()
    times = []
    for _ in range(10):
        t = time.perf_counter()
        f(a, b).block_until_ready()
        times.append(time.perf_counter() - t)
    return 2 * 8192 ** 3 / sorted(times)[len(times) // 2] / 1e12


def model_flops_per_token(cfg, seq):
    H, I, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    n_matmul = L * (H * q + 2 * H * kv + q * H + 3 * H * I) + H * cfg.vocab_size
    attn_fwd = L * 2 * 2 * (seq / 2) * cfg.num_heads * cfg.head_dim
    return 4 * n_matmul + 3 * attn_fwd


def profile_steps(run_step, out_dir, n=2, top=30):
    """Trace `n` steps (perfetto JSON) and print the GPU kernels that took the most time."""
    import glob
    import gzip
    import jax

    jax.profiler.start_trace(out_dir, create_perfetto_trace=True)
    for i in range(n):
        jax.block_until_ready(run_step(i))
    jax.profiler.stop_trace()
    path = sorted(glob.glob(os.path.join(out_dir, "**", "*.trace.json.gz"), recursive=True))[-1]
    events = json.load(gzip.open(path))
    events = events.get("traceEvents", events) if isinstance(events, dict) else events
    gpu_pids = {e["pid"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"
                and "gpu" in str(e.get("args", {}).get("name", "")).lower()}
    totals, counts = {}, {}
    for e in events:
        if e.get("ph") == "X" and e.get("pid") in gpu_pids:
            totals[e["name"]] = totals.get(e["name"], 0.0) + e.get("dur", 0.0)
            counts[e["name"]] = counts.get(e["name"], 0) + 1
    all_us = sum(totals.values())
    print(f"PROFILE {len(totals)} kernel names, {all_us / n / 1e3:.1f} ms GPU time per step ({path})")
    for name, us in sorted(totals.items(), key=lambda kv: -kv[1])[:top]:
        print(f"PROFILE {us / n / 1e3:8.2f} ms/step {100 * us / all_us:5.1f}% x{counts[name] // n:4d}  {name[:110]}")


def override_tuning(fields):
    """Set attention Tuning fields for the whole step (flash_attention's defaults otherwise), e.g.
    {"mosaic_packed": false}: packed rows (the training batches always carry segment ids, padding
    is segment 0) on the Triton kernels, as before session 6; {"rope_in_kernel": true}: RoPE in
    the Mosaic kernels, as before session 6."""
    import dataclasses

    from pallas_kernels import attention

    default = attention.default_tuning
    attention.default_tuning = lambda *a, **k: dataclasses.replace(default(*a, **k), **fields)


def packed_segment_ids(rng, shape, docs):
    """Segment ids of rows packed with documents of uniform random lengths in docs=(min, max)."""
    ids = np.zeros(shape, np.int32)
    for row in np.ndindex(shape[:-1]):
        t, n = 0, 1
        while t < shape[-1]:
            length = int(rng.integers(docs[0], docs[1] + 1))
            ids[row + (slice(t, t + length),)] = n
            t, n = t + length, n + 1
    return ids


def run_one(shape, policy, batch, seq, steps, warmup, quant, profile_dir=None, docs=None):
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from unsloth_jax.lora import add_lora
    from unsloth_jax.models import Decoder, ModelConfig
    from unsloth_jax.models.decoder import default_positions
    from unsloth_jax.train.optim import make_optimizer
    from unsloth_jax.train.step import init_state, make_train_step, split_model

    hf = dict(SHAPES[shape], model_type="llama", rms_norm_eps=1e-5, max_position_embeddings=131072)
    cfg = ModelConfig.from_hf(hf)
    model = Decoder(cfg, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    if quant == "nf4":
        from unsloth_jax.quant import quantize_nf4

        for name, lin in model.layers.linears().items():
            w = lin.kernel.value
            parts = [quantize_nf4(jnp.asarray(w[i]).T) for i in range(w.shape[0])]
            lin.kernel.value = jax.tree.map(lambda *xs: jnp.stack(xs), *parts)
            del w
    add_lora(model, r=16, lora_alpha=16, use_gradient_checkpointing=policy)
    model.training = True
    split, params = split_model(model)
    tx = make_optimizer(split.names, learning_rate=1e-4, total_steps=1000, warmup_steps=0)
    state = init_state(params, tx, 0)
    step = make_train_step(split, tx)
    rng = np.random.default_rng(0)

    def batch_of():
        ids = rng.integers(0, cfg.vocab_size, (1, batch, seq)).astype(np.int32)
        labels = np.concatenate([ids[..., 1:], np.full((1, batch, 1), -100, np.int32)], -1)
        seg = packed_segment_ids(rng, ids.shape, docs) if docs else np.ones_like(ids)
        pos = np.asarray(default_positions(seg.reshape(batch, seq).shape, seg.reshape(batch, seq))).reshape(seg.shape)
        return {"input_ids": ids, "labels": labels, "segment_ids": seg, "positions": pos}

    batches = [jax.device_put(batch_of()) for _ in range(2)]
    # The step's own footprint (arguments + XLA temporaries), free of the random-init transients
    # that peak_bytes_in_use also saw.
    mem = step.lower(state, split.frozen, batches[0]).compile().memory_analysis()
    step_bytes = (mem.argument_size_in_bytes + mem.temp_size_in_bytes + mem.output_size_in_bytes
                  - mem.alias_size_in_bytes) if mem is not None else 0
    host_bytes = getattr(mem, "host_temp_size_in_bytes", 0) if mem is not None else 0
    t0 = time.perf_counter()
    state, m = step(state, split.frozen, batches[0])
    jax.block_until_ready(m)
    compile_s = time.perf_counter() - t0
    for i in range(warmup):
        state, m = step(state, split.frozen, batches[i % 2])
    jax.block_until_ready(m)
    times, losses = [], []
    for i in range(steps):
        t = time.perf_counter()
        state, m = step(state, split.frozen, batches[i % 2])
        losses.append(float(m["loss"]))  # syncs: one step = one timed unit
        times.append(time.perf_counter() - t)
    med = sorted(times)[len(times) // 2]
    if profile_dir:
        holder = {"state": state}  # the step donates its state: carry the new one forward

        def advance(i):
            holder["state"], metrics = step(holder["state"], split.frozen, batches[i % 2])
            return metrics

        profile_steps(advance, profile_dir)
        state = holder["state"]
    tokens = batch * seq
    peak = (jax.local_devices()[0].memory_stats() or {}).get("peak_bytes_in_use", 0)
    peak_rate = matmul_tflops()
    flops = model_flops_per_token(cfg, seq) * tokens / med
    return {"impl": "unsloth_jax", "shape": shape, "quant": quant, "policy": model.remat_policy, "batch": batch,
            "seq": seq, "tokens_per_s": tokens / med, "step_ms": med * 1e3, "peak_gib": peak / 2**30,
            "step_gib": step_bytes / 2**30, "host_offload_gib": host_bytes / 2**30,
            "mfu": flops / (peak_rate * 1e12), "model_tflops": flops / 1e12, "matmul_tflops": peak_rate,
            "compile_s": compile_s, "loss_first": losses[0], "loss_last": losses[-1],
            "jax": jax.__version__, "device": jax.devices()[0].device_kind,
            "kernels": os.environ.get("UNSLOTH_JAX_KERNELS", "default"), "docs": docs}


def matrix(args):
    rows = []
    for shape in args.shapes.split(","):
        for policy in args.policies.split(","):
            for quant in args.quants.split(","):
                cmd = [sys.executable, __file__, "--shape", shape, "--policy", policy, "--quant", quant,
                       "--batch", str(DEFAULT_BATCH[shape]), "--seq", str(args.seq), "--steps", str(args.steps)]
                cmd += ["--docs", args.docs] if args.docs else []
                cmd += ["--triton-packed"] if args.triton_packed else []
                cmd += ["--tuning", args.tuning] if args.tuning else []
                t = time.perf_counter()
                p = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
                lines = [l for l in p.stdout.splitlines() if l.startswith("RESULT ")]
                if lines:
                    row = json.loads(lines[-1][7:])
                else:
                    err = (p.stderr.strip().splitlines() or ["?"])[-1][:200]
                    row = {"shape": shape, "policy": policy, "quant": quant, "error": err}
                row["wall_s"] = time.perf_counter() - t
                rows.append(row)
                print("RESULT " + json.dumps(row), flush=True)
    print(f"\n{'shape':9} {'quant':5} {'policy':9} {'batch':>5} {'tok/s':>9} {'step ms':>8} {'peak GiB':>8} "
          f"{'step GiB':>8} {'MFU':>6}")
    for r in rows:
        if "error" in r:
            print(f"{r['shape']:9} {r['quant']:5} {r['policy']:9} ERROR {r['error']}")
        else:
            print(f"{r['shape']:9} {r['quant']:5} {r['policy']:9} {r['batch']:5d} {r['tokens_per_s']:9.0f} "
                  f"{r['step_ms']:8.1f} {r['peak_gib']:8.2f} {r['step_gib']:8.2f} {r['mfu']:6.1%}")
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(json.dumps(r) for r in rows) + "\n")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--matrix", action="store_true", help="run shapes x policies x quants, one process each")
    p.add_argument("--shapes", default="llama-1b,llama-8b")
    p.add_argument("--policies", default="full,unsloth,selective,none")
    p.add_argument("--quants", default="bf16")
    p.add_argument("--shape", default="llama-1b", choices=sorted(SHAPES))
    p.add_argument("--policy", default="full", help="false|true|full|unsloth|selective|none")
    p.add_argument("--quant", default="bf16", choices=["bf16", "nf4"])
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--timeout", type=int, default=240)
    p.add_argument("--out", default=None, help="write the rows as JSONL here")
    p.add_argument("--profile", default=None, help="also trace 2 steps into this folder and print the top GPU kernels")
    p.add_argument("--docs", default=None, help="MIN,MAX: pack rows with documents of random lengths (segment ids)")
    p.add_argument("--triton-packed", action="store_true",
                   help="attention with segment ids on the Triton kernels, not Mosaic (Tuning.mosaic_packed=False)")
    p.add_argument("--tuning", default=None, help='attention Tuning fields as JSON, e.g. \'{"rope_in_kernel": true}\'')
    args = p.parse_args()
    if args.matrix:
        return matrix(args)
    batch = args.batch or DEFAULT_BATCH[args.shape]
    tuning = json.loads(args.tuning) if args.tuning else {}
    tuning.update({"mosaic_packed": False} if args.triton_packed else {})
    if tuning:
        override_tuning(tuning)
    docs = tuple(int(x) for x in args.docs.split(",")) if args.docs else None
    row = run_one(args.shape, args.policy, batch, args.seq, args.steps, args.warmup, args.quant, args.profile, docs)
    row["tuning"] = tuning
    print("RESULT " + json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
