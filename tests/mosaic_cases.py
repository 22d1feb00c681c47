"""Shared inputs for the Mosaic GPU attention kernel tests: random q/k/v/dO, the float16 RoPE
tables the kernels take, packed segment ids, and the reference lse / delta / gradients."""
import math

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.attention import apply_rope, flash_attention_reference, rope_cos_sin

HEAD_DIM = 128


def interpret_params():
    """How the tests run a Mosaic GPU kernel on the CPU: JAX's interpreter with its happens-before
    race detector on (a thread per warpgroup, vector clocks through barriers and async copies; no
    measurable cost at these sizes), so a missing or misplaced barrier between warpgroups fails a
    test instead of waiting for a GPU run. Races inside one warpgroup (Pallas' automatic barriers)
    are out of its view: it runs a warpgroup as one thread."""
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
    return InterpretGPUParams(detect_races=True)


def races_found():
    """Whether the race detector saw a race in the last kernel the interpreter ran (call after its
    result is ready)."""
    from jax._src.pallas.mosaic_gpu.interpret import gpu_callbacks
    return gpu_callbacks.get_races().races_found


def packed_segments(B, T, seed):
    """int32 [B, T]: random contiguous documents (some shorter than a 64-row tile, one spanning
    several tiles) and a padding segment 0 at the end of each row."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(B):
        cuts = np.sort(rng.choice(np.arange(1, T - 9), size=4, replace=False))
        ids = np.zeros(T, np.int32)
        for n, (a, e) in enumerate(zip([0, *cuts], [*cuts, T - 9])):
            ids[a:e] = n + 1
        rows.append(ids)
    return jnp.asarray(np.stack(rows))


def inputs(B, T, Hq, Hkv, seed, head_dim=HEAD_DIM):
    ks = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(ks[0], (B, T, Hq, head_dim), jnp.bfloat16)
    k = jax.random.normal(ks[1], (B, T, Hkv, head_dim), jnp.bfloat16)
    v = jax.random.normal(ks[2], (B, T, Hkv, head_dim), jnp.bfloat16)
    do = jax.random.normal(ks[3], (B, T, Hq, head_dim), jnp.bfloat16)
    inv_freq = 1.0 / (500000.0 ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    return q, k, v, do, inv_freq


def rope_tables(T, inv_freq):
    """float16 cos/sin [1, T, D/2], as flash_attention builds them for 16-bit inputs."""
    ang = jnp.arange(T, dtype=jnp.float32)[None, :, None] * inv_freq
    return jnp.cos(ang).astype(jnp.float16), jnp.sin(ang).astype(jnp.float16)


def reference_lse(q, k, inv_freq, scale, seg=None, window=None, softcap=None):
    """log2-sum-exp2 of the visible scores times scale*log2(e), [B, Hq, T] (the kernels' lse)."""
    T, G = q.shape[1], q.shape[2] // k.shape[2]
    if inv_freq is not None:
        cos, sin = rope_cos_sin(jnp.arange(T)[None], inv_freq)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    k = jnp.repeat(k, G, axis=2)
    s = jnp.einsum("bqhd,bkhd->bhqk", q.astype(jnp.float32), k.astype(jnp.float32)) * scale
    if softcap is not None:
        s = softcap * jnp.tanh(s / softcap)
    s = s * math.log2(math.e)
    visible = jnp.tril(jnp.ones((T, T), bool))[None]
    if seg is not None:
        visible = visible & (seg[:, :, None] == seg[:, None, :])
    if window is not None:
        visible = visible & ~jnp.tril(jnp.ones((T, T), bool), -window)[None]  # i - j >= W hidden
    s = jnp.where(visible[:, None], s, -jnp.inf)
    return jax.nn.logsumexp(s * math.log(2), axis=-1) / math.log(2)


def backward_case(B, T, Hq, Hkv, *, rope, segments, seed, head_dim=HEAD_DIM, window=None, softcap=None):
    """The backward kernels' arguments (q, k, v, do, lse, delta[, cos, sin]), the segment ids (or
    None), the scale, and the reference (dq, dk, dv) from jax.vjp of the jnp reference (with a
    sliding window and logit softcap if given; q scaled up 4x with a softcap, so that it bites)."""
    q, k, v, do, inv_freq = inputs(B, T, Hq, Hkv, seed, head_dim)
    inv_freq = inv_freq if rope else None
    seg = packed_segments(B, T, seed) if segments else None
    scale = head_dim ** -0.5
    if softcap is not None:
        q = q * 4
    o, vjp = jax.vjp(lambda q, k, v: flash_attention_reference(q, k, v, inv_freq=inv_freq, segment_ids=seg,
                                                               sliding_window=window, logit_softcap=softcap), q, k, v)
    lse = reference_lse(q, k, inv_freq, scale, seg, window, softcap)
    delta = jnp.einsum("bqhd,bqhd->bhq", do.astype(jnp.float32), o.astype(jnp.float32))
    tables = rope_tables(T, inv_freq) if rope else ()
    return (q, k, v, do, lse, delta, *tables), seg, scale, vjp(do)


def rel_err(x, ref):
    x, ref = x.astype(jnp.float32), ref.astype(jnp.float32)
    return float(jnp.max(jnp.abs(x - ref)) / jnp.max(jnp.abs(ref)))


# Who emits a warpgroup barrier a Mosaic kernel asked for itself (commit_smem, waiting on a
# reduce-add's smem reads); every other caller is one of Pallas' automatic ones around smem stores.
KERNEL_REQUESTED_BARRIERS = {"commit_shared", "await_async_copy"}


def barrier_callers(lower):
    """(kernel-requested, automatic) warpgroup-barrier emitters, by function name, while lower()
    lowers something for CUDA (on JAX 0.10 Pallas' store and copy rules emit the automatic ones,
    on 0.11 the Mosaic GPU dialect's lowering)."""
    import sys
    import jax.experimental.mosaic.gpu as mgpu
    import pytest
    from jax.experimental.mosaic.gpu import utils as mgpu_utils
    callers = []
    real = mgpu_utils.warpgroup_barrier

    def counting_barrier(*a, **k):
        callers.append(sys._getframe(1).f_code.co_name)
        return real(*a, **k)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(mgpu_utils, "warpgroup_barrier", counting_barrier)
        mp.setattr(mgpu, "warpgroup_barrier", counting_barrier)
        lower()
    return ([c for c in callers if c in KERNEL_REQUESTED_BARRIERS],
            [c for c in callers if c not in KERNEL_REQUESTED_BARRIERS])
