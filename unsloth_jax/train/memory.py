"""A device-memory estimate printed before training, so a run that cannot fit says so up front."""
from __future__ import annotations

import jax
import numpy as np

from unsloth_jax.models.loss import default_chunk_tokens


def tree_nbytes(tree) -> int:
    return int(sum(np.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree) if hasattr(x, "shape")))


OVERHEAD_BYTES = 1 << 30  # CUDA context, XLA workspace, fragmentation


def activation_bytes(cfg, tokens: int, remat_policy: str, act_bytes: int = 2) -> int:
    """Activation memory of one micro-batch of `tokens` under the remat policy: what each layer keeps
    for the backward pass, one layer's working set while it is recomputed and differentiated, one
    loss chunk, and a fixed overhead. With weights and LoRA state added it is conservative: for the
    Llama-3.1-8B / 3.2-1B shapes on an H100 it exceeds the compiled step's footprint by 1.4 / 1.8 GiB,
    1 GiB of which is the fixed overhead (CUDA context, fragmentation) that footprint does not show
    (benchmarks/RESULTS.md section 0, call F; it was within 0.3 GiB before the loss stopped
    recomputing its logits)."""
    H, I = cfg.hidden_size, cfg.intermediate_size
    qkv = (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim
    per_layer_full = tokens * (4 * H + 2 * qkv + 3 * I) * act_bytes  # everything a layer produces
    saved_per_layer = {"none": per_layer_full, "selective": tokens * (H + qkv + 2 * I + H) * act_bytes,
                       "full": tokens * H * act_bytes, "offload": 0}.get(remat_policy, per_layer_full)
    # The loss's chunk: fp32 logits and their fp32 gradient.
    loss_chunk = default_chunk_tokens(tokens, cfg.vocab_size) * cfg.vocab_size * 4 * 2
    return cfg.num_layers * saved_per_layer + 2 * per_layer_full + loss_chunk + OVERHEAD_BYTES


def estimate_memory(model, trainable_params: dict, *, batch_size: int, seq_len: int, remat_policy: str) -> dict:
    """Bytes for the weights (as they sit on the device), the trainable state (params + grads + two
    AdamW moments, fp32) and the activations of one micro-batch."""
    from flax import nnx

    weights = tree_nbytes(nnx.state(model))  # includes the trainable params once
    trainable = tree_nbytes(trainable_params)
    activations = activation_bytes(model.config, batch_size * seq_len, remat_policy,
                                   np.dtype(model.dtype).itemsize)
    return {"weights": weights, "trainable+grads+adam": 4 * trainable, "activations": activations,
            "total": weights + 3 * trainable + activations}


def device_capacity() -> int | None:
    try:
        stats = jax.local_devices()[0].memory_stats()
        return int(stats.get("bytes_limit")) if stats and stats.get("bytes_limit") else None
    except Exception:
        return None


def device_peak_bytes() -> int | None:
    try:
        stats = jax.local_devices()[0].memory_stats()
        return int(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else None
    except Exception:
        return None


def gib(n) -> str:
    return "n/a" if n is None else f"{n / 2**30:.2f} GiB"


def format_estimate(est: dict) -> str:
    parts = ", ".join(f"{k} {gib(v)}" for k, v in est.items() if k != "total")
    cap = device_capacity()
    line = f"Estimated device memory: {gib(est['total'])} ({parts})"
    if cap:
        line += f"; device has {gib(cap)}"
        if est["total"] > cap:
            line += (" -- LIKELY OUT OF MEMORY: lower per_device_train_batch_size or max_seq_length, "
                     "use gradient_checkpointing: unsloth, or load_in_4bit: true")
    return line
