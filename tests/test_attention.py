"""Flash attention: the Pallas kernels (interpret mode on CPU) against the jnp reference,
and the reference against a naive per-token numpy loop."""
import numpy as np
import pytest

import jax
import jax.numpy as jnp

from pallas_kernels import attention as attn
from pallas_kernels.attention import flash_attention, flash_attention_reference


def _inv_freq(D, base=10000.0):
    return 1.0 / (base ** (np.arange(0, D, 2, dtype=np.float32) / D))


def _segments(B, T, rng):
    """Several contiguous documents per row, then a padding segment 0 at the end."""
    rows = []
    for _ in range(B):
        cuts = np.sort(rng.choice(np.arange(1, T - 3), size=3, replace=False))
        ids = np.zeros(T, np.int32)
        start = 0
        for n, end in enumerate([*cuts, T - 3]):
            ids[start:end] = n + 1
            start = end
        rows.append(ids)  # the last 3 tokens keep id 0: padding
    return jnp.asarray(np.stack(rows))


def _inputs(B, T, Hq, Hkv, D, dtype, seed=0):
    ks = jax.random.split(jax.random.PRNGKey(seed), 4)
    q = jax.random.normal(ks[0], (B, T, Hq, D), jnp.float32).astype(dtype)
    k = jax.random.normal(ks[1], (B, T, Hkv, D), jnp.float32).astype(dtype)
    v = jax.random.normal(ks[2], (B, T, Hkv, D), jnp.float32).astype(dtype)
    do = jax.random.normal(ks[3], (B, T, Hq, D), jnp.float32).astype(dtype)
    return q, k, v, do


def _rel_err(a, b):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    assert np.isfinite(a).all()
    return float(np.abs(a - b).max() / np.abs(b).max())


# ------------------------------------------------------------------ reference vs numpy

def _naive_numpy(q, k, v, positions, segment_ids, inv_freq, causal, window, softcap, scale):
    """Per-token loop in float64: the definition written out longhand."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    B, T, Hq, D = q.shape
    G = Hq // k.shape[2]
    half = D // 2

    def rope(x, pos):  # x [D], HF rotate-half
        ang = pos * np.asarray(inv_freq, np.float64)
        c, s = np.cos(ang), np.sin(ang)
        x1, x2 = x[:half], x[half:]
        return np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s])

    out = np.zeros_like(q)
    for b in range(B):
        for h in range(Hq):
            for i in range(T):
                qi = rope(q[b, i, h], positions[b, i])
                logits, vals = [], []
                for j in range(T):
                    if causal and j > i:
                        continue
                    if window is not None and i - j >= window:
                        continue
                    if segment_ids[b, i] != segment_ids[b, j]:
                        continue
                    s = scale * qi @ rope(k[b, j, h // G], positions[b, j])
                    if softcap is not None:
                        s = softcap * np.tanh(s / softcap)
                    logits.append(s)
                    vals.append(v[b, j, h // G])
                w = np.exp(np.array(logits) - max(logits))
                out[b, i, h] = (w / w.sum()) @ np.array(vals)
    return out


def test_reference_matches_naive_loop():
    rng = np.random.default_rng(0)
    B, T, Hq, Hkv, D = 2, 10, 4, 2, 8
    q, k, v, _ = _inputs(B, T, Hq, Hkv, D, jnp.float32, seed=1)
    positions = jnp.asarray(rng.integers(0, 50, size=(B, T)), jnp.int32)
    seg = jnp.asarray([[1] * 4 + [2] * 3 + [0] * 3, [3] * 10])
    inv_freq = _inv_freq(D)
    kw = dict(causal=True, window=4, softcap=3.0, scale=0.3)
    want = _naive_numpy(q, k, v, np.asarray(positions), np.asarray(seg), inv_freq, **kw)
    got = flash_attention_reference(q, k, v, positions=positions, segment_ids=seg,
                                    inv_freq=jnp.asarray(inv_freq), causal=True,
                                    sliding_window=4, logit_softcap=3.0, scale=0.3)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
    # Non-causal, no RoPE, default scale.
    want = _naive_numpy(q, k, v, np.zeros((B, T)), np.zeros((B, T)), np.zeros(D // 2),
                        causal=False, window=None, softcap=None, scale=D ** -0.5)
    got = flash_attention_reference(q, k, v, causal=False)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ kernel vs reference

CASES = {
    # name: (B, T, Hq, Hkv, D, dtype, kwargs)
    "causal_rope_f32": (1, 40, 2, 2, 64, jnp.float32, dict(rope=True)),
    "causal_norope_f32": (2, 40, 2, 2, 64, jnp.float32, dict()),
    "segments_gqa4_rope_f32": (2, 40, 8, 2, 64, jnp.float32, dict(rope=True, segments=True)),
    "segments_gqa8_bf16": (2, 40, 8, 1, 64, jnp.bfloat16, dict(rope=True, segments=True)),
    "window_f32": (1, 40, 4, 1, 64, jnp.float32, dict(rope=True, sliding_window=7)),
    "softcap_window_d80_f32": (1, 40, 4, 2, 80, jnp.float32,
                               dict(rope=True, sliding_window=9, logit_softcap=2.0)),
    "softcap_bf16": (1, 40, 2, 1, 64, jnp.bfloat16, dict(logit_softcap=5.0, scale=0.2)),
    "odd_t17_gqa4_bf16": (1, 17, 4, 1, 64, jnp.bfloat16, dict(rope=True)),
    "odd_t130_d96_gqa8_bf16": (1, 130, 8, 1, 96, jnp.bfloat16, dict(rope=True, blocks=(32, 64))),
    "d96_segments_positions_f32": (2, 40, 2, 1, 96, jnp.float32,
                                   dict(rope=True, segments=True, positions=True)),
    "noncausal_padded_f32": (1, 17, 2, 1, 64, jnp.float32, dict(causal=False, rope=True)),
    "noncausal_window_segments_f32": (1, 40, 2, 2, 64, jnp.float32,
                                      dict(causal=False, sliding_window=6, segments=True)),
    "blocks_q32_k16_f32": (1, 40, 2, 1, 64, jnp.float32, dict(rope=True, blocks=(32, 16))),
    # GQA without head packing (the dk/dv kernel loops over the 4 heads one at a time) and
    # with partial packing (pairs of heads), mixed block sizes per kernel.
    "gqa4_pack1_f32": (1, 40, 4, 1, 64, jnp.float32,
                       dict(rope=True, segments=True, tuning=attn.Tuning(
                           fwd_q=16, fwd_k=32, dq_q=32, dq_k=16, dkv_k=16, dkv_q=32, pack=1))),
    "gqa8_pack2_bf16": (1, 40, 8, 1, 64, jnp.bfloat16,
                        dict(rope=True, sliding_window=11, tuning=attn.Tuning(
                            fwd_q=32, fwd_k=16, dq_q=16, dq_k=32, dkv_k=32, dkv_q=16, pack=2))),
    # RoPE by XLA before the kernels (the default on the Mosaic kernels), packed with positions
    "rope_by_xla_segments_gqa4_f32": (2, 40, 8, 2, 64, jnp.float32, dict(rope=True, segments=True, tuning=attn.Tuning(
        fwd_q=16, fwd_k=16, dq_q=16, dq_k=16, dkv_k=16, dkv_q=16, rope_in_kernel=False))),
}


def _kernel_kwargs(B, T, D, opts, rng):
    kw = {k: opts[k] for k in ("sliding_window", "logit_softcap", "scale", "causal") if k in opts}
    if opts.get("rope"):
        kw["inv_freq"] = jnp.asarray(_inv_freq(D))
    if opts.get("segments"):
        kw["segment_ids"] = _segments(B, T, rng)
        # Positions restart at 0 in every document, as packing produces them.
        seg = np.asarray(kw["segment_ids"])
        pos = np.zeros_like(seg)
        for b in range(B):
            for t in range(1, T):
                pos[b, t] = 0 if seg[b, t] != seg[b, t - 1] else pos[b, t - 1] + 1
        kw["positions"] = jnp.asarray(pos)
    if opts.get("positions") and "positions" not in kw:
        kw["positions"] = jnp.asarray(rng.integers(0, 4 * T, size=(B, T)), jnp.int32)
    return kw


@pytest.mark.parametrize("name", list(CASES))
def test_flash_attention_matches_reference(name):
    B, T, Hq, Hkv, D, dtype, opts = CASES[name]
    rng = np.random.default_rng(abs(hash(name)) % 2**32)
    q, k, v, do = _inputs(B, T, Hq, Hkv, D, dtype)
    kw = _kernel_kwargs(B, T, D, opts, rng)
    bq, bk = opts.get("blocks", (16, 16))
    if "tuning" in opts:
        kw_blocks = dict(tuning=opts["tuning"])
    else:
        kw_blocks = dict(block_q=bq, block_k=bk)

    def fwd_bwd(fn):
        @jax.jit  # one compile instead of op-by-op dispatch: keeps interpret mode fast
        def run(q, k, v, do):
            out, vjp = jax.vjp(fn, q, k, v)
            return out, vjp(do)
        return run(q, k, v, do)

    out, grads = fwd_bwd(lambda *a: flash_attention(*a, interpret=True, **kw_blocks, **kw))
    ref_out, ref_grads = fwd_bwd(lambda *a: flash_attention_reference(*a, **kw))

    assert out.dtype == dtype and out.shape == q.shape
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    for what, got, want in zip(("out", "dq", "dk", "dv"), (out, *grads), (ref_out, *ref_grads)):
        assert got.shape == want.shape and got.dtype == want.dtype, what
        err = _rel_err(got, want)
        assert err < tol, f"{name}: {what} relative error {err:.2e} >= {tol}"


def test_traced_sliding_window_under_jit():
    """Per-layer windows (e.g. Gemma-2 inside a scan) arrive as traced scalars."""
    q, k, v, do = _inputs(1, 40, 2, 1, 64, jnp.float32, seed=3)

    def loss(q, k, v, w):
        return jnp.sum(flash_attention(q, k, v, sliding_window=w, interpret=True,
                                       block_q=16, block_k=16) * do)

    def ref_loss(q, k, v, w):
        return jnp.sum(flash_attention_reference(q, k, v, sliding_window=w) * do)

    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    ref_grad = jax.jit(jax.grad(ref_loss, argnums=(0, 1, 2)))
    for w in (5, 1000):
        for g, r in zip(grad(q, k, v, jnp.int32(w)), ref_grad(q, k, v, jnp.int32(w))):
            assert _rel_err(g, r) < 1e-5


# ------------------------------------------------------------------ block skipping

def _cfg(T, causal=True, window=False, segments=False, Tp=None):
    return attn._Cfg(seq_len=T, seq_pad=Tp or T, head_dim=64, head_pad=64, num_groups=1, pack=1,
                     causal=causal, has_window=window, has_segments=segments, rope=False,
                     softcap=None, scale=1.0, tuning=attn.Tuning(), interpret=True)


@pytest.mark.parametrize("by_key", [False, True])
@pytest.mark.parametrize("setting", ["causal", "window", "segments", "noncausal_pad"])
def test_block_ranges_visit_exactly_the_needed_blocks(setting, by_key):
    """Every block with a visible pair is visited, blocks run unmasked are fully visible,
    and (without repeated segment ids) no fully masked block is visited."""
    T, bq, bk = 96, 16, 32
    rng = np.random.default_rng(1)
    seg = None
    aux = {}
    if setting == "causal":
        cfg = _cfg(T)
    elif setting == "window":
        cfg = _cfg(T, window=True)
        aux["window"] = jnp.array([20], jnp.int32)
    elif setting == "segments":
        cfg = _cfg(T, segments=True)
        seg = np.asarray(_segments(2, T, rng))
        aux["seg"] = jnp.asarray(seg)
    else:
        cfg = _cfg(80, causal=False, Tp=T)
    ranges = np.asarray(attn._block_ranges(cfg, bq, bk, aux, by_key=by_key))

    i = np.arange(T)[:, None]
    j = np.arange(T)[None, :]
    vis = np.ones((T, T), bool)
    if cfg.causal:
        vis &= j <= i
    if cfg.has_window:
        vis &= i - j < 20
    if cfg.mask_kv_pad:
        vis &= (j < cfg.seq_len) | (i >= cfg.seq_len)
    vis = np.broadcast_to(vis, (ranges.shape[0], T, T))
    if seg is not None:
        vis = vis & (seg[:, :, None] == seg[:, None, :])
    blocks = vis.reshape(-1, T // bq, bq, T // bk, bk).transpose(0, 1, 3, 2, 4)
    any_vis, all_vis = blocks.any((-1, -2)), blocks.all((-1, -2))
    if by_key:
        any_vis, all_vis = any_vis.transpose(0, 2, 1), all_vis.transpose(0, 2, 1)
    for b in range(ranges.shape[0]):
        for row, (lo, a, bb, hi) in enumerate(ranges[b]):
            assert lo <= a <= bb <= hi
            visited = np.zeros(any_vis.shape[-1], bool)
            visited[lo:hi] = True
            assert not (any_vis[b, row] & ~visited).any(), "a visible block is skipped"
            assert all_vis[b, row, a:bb].all(), "a block run unmasked has masked pairs"
            if seg is None:  # segment skipping is by per-block id ranges: a superset
                assert any_vis[b, row, lo:hi].all(), "a fully masked block is visited"
    if seg is not None:  # most cross-document blocks are skipped
        visited = sum(hi - lo for lo, _, _, hi in ranges.reshape(-1, 4))
        assert visited < 1.5 * any_vis.sum()
    if setting == "causal" and not by_key:
        # The unmasked interior is used: all but the diagonal blocks run without a mask.
        assert (ranges[0, :, 2] - ranges[0, :, 1]).sum() > 0


# ------------------------------------------------------------------ dispatcher

def test_attention_dispatch(monkeypatch):
    q, k, v, _ = _inputs(1, 17, 2, 1, 64, jnp.float32, seed=2)
    kw = dict(inv_freq=jnp.asarray(_inv_freq(64)))
    monkeypatch.setenv("UNSLOTH_JAX_KERNELS", "reference")
    ref = attn.attention(q, k, v, **kw)
    np.testing.assert_array_equal(np.asarray(ref), np.asarray(flash_attention_reference(q, k, v, **kw)))
    monkeypatch.setenv("UNSLOTH_JAX_KERNELS", "interpret")
    got = attn.attention(q, k, v, **kw)
    assert _rel_err(got, ref) < 1e-5


# ------------------------------------------------------------------ in the model

@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_model_logits_and_lora_grads_interpret_equal_reference(family, tmp_path, monkeypatch):
    """Llama (llama3 rope scaling, GQA) and Gemma-2 (softcap, alternating windows), packed."""
    from flax import nnx

    from hf_models import make_hf_model
    from unsloth_jax import FastLanguageModel
    from unsloth_jax.lora import trainable_filter

    make_hf_model(family).save_pretrained(tmp_path / "m")
    model, _ = FastLanguageModel.from_pretrained(str(tmp_path / "m"), dtype="float32")
    model = FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8, random_state=0)
    rng = np.random.default_rng(5)
    ids = jnp.asarray(rng.integers(0, 101, (2, 19)))
    labels = jnp.asarray(rng.integers(0, 101, (2, 19)))
    seg = jnp.asarray([[1] * 9 + [2] * 8 + [0] * 2, [3] * 19])

    calls = []
    kernel = attn.flash_attention
    monkeypatch.setattr(attn, "flash_attention", lambda *a, **kw: calls.append(1) or kernel(*a, **kw))

    def run(mode):
        monkeypatch.setenv("UNSLOTH_JAX_KERNELS", mode)
        logits = model(ids, segment_ids=seg)
        grads = nnx.grad(lambda m: m.loss(ids, labels, segment_ids=seg),
                         argnums=nnx.DiffState(0, trainable_filter(model)))(model)
        return logits, jax.tree.leaves(grads)

    ref_logits, ref_grads = run("reference")
    assert not calls
    logits, grads = run("interpret")
    assert calls, "the model did not go through the Pallas kernel"
    assert _rel_err(logits, ref_logits) < 1e-5
    assert len(grads) == len(ref_grads) > 0
    assert any(np.abs(np.asarray(r)).max() > 0 for r in ref_grads)
    for g, r in zip(grads, ref_grads):
        if np.abs(np.asarray(r)).max() > 0:
            assert _rel_err(g, r) < 1e-4
