"""Causal attention with RoPE applied inside, GQA, packing (segment ids), sliding window, softcap.

`flash_attention_reference` is the plain-jnp definition every kernel here must match.
Conventions (shared by the model and the kernels):
- q: [B, T, Hq, D], k/v: [B, T, Hkv, D], Hq a multiple of Hkv; q/k arrive *un-rotated*.
- positions: int [B, T]; RoPE uses HF's rotate-half layout with `inv_freq` [D//2] float32
  (any rope scaling already folded into inv_freq); inv_freq=None means no RoPE.
- segment_ids: int [B, T] or None; a query attends only to keys of the same segment id.
- causal: key index j <= query index i; sliding_window=W keeps keys with i - j < W.
- logit_softcap=c: scores become c * tanh(scores / c) before masking.
- scale: defaults to D ** -0.5.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

NEG_INF = -1e30


def rope_cos_sin(positions, inv_freq):
    """cos/sin of shape [B, T, D] (halves repeated, HF layout) in float32."""
    angles = positions.astype(jnp.float32)[..., None] * inv_freq.astype(jnp.float32)
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x, cos, sin):
    """Rotate x [B, T, H, D] by cos/sin [B, T, D] (HF rotate_half); computed in float32."""
    xf = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-xf[..., half:], xf[..., :half]], axis=-1)
    out = xf * cos[:, :, None, :] + rotated * sin[:, :, None, :]
    return out.astype(x.dtype)


def attention_mask(T_q, T_k, segment_ids_q=None, segment_ids_k=None, causal=True, sliding_window=None):
    """Boolean [B or 1, T_q, T_k] mask of which keys each query may see (query i at index i)."""
    i = jnp.arange(T_q)[:, None]
    j = jnp.arange(T_k)[None, :]
    mask = jnp.ones((T_q, T_k), dtype=bool)
    if causal:
        mask &= j <= i
    if sliding_window is not None:
        mask &= (i - j) < sliding_window
    mask = mask[None]
    if segment_ids_q is not None:
        mask = mask & (segment_ids_q[:, :, None] == segment_ids_k[:, None, :])
    return mask


def flash_attention_reference(q, k, v, *, positions=None, segment_ids=None, inv_freq=None,
                              causal=True, sliding_window=None, logit_softcap=None, scale=None):
    """Plain-jnp attention: returns [B, T, Hq, D] in q's dtype; softmax in float32."""
    B, T, Hq, D = q.shape
    Hkv = k.shape[2]
    if scale is None:
        scale = D ** -0.5
    if inv_freq is not None:
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(T), (B, T))
        cos, sin = rope_cos_sin(positions, inv_freq)
        q = apply_rope(q, cos, sin)
        k = apply_rope(k, cos, sin)
    qg = q.reshape(B, T, Hkv, Hq // Hkv, D)
    scores = jnp.einsum("bqhgd,bkhd->bhgqk", qg, k, preferred_element_type=jnp.float32) * scale
    if logit_softcap is not None:
        scores = logit_softcap * jnp.tanh(scores / logit_softcap)
    mask = attention_mask(T, T, segment_ids, segment_ids, causal, sliding_window)
    scores = jnp.where(mask[:, None, None], scores, NEG_INF)
    probs = jax.nn.softmax(scores, axis=-1)
    # Rows with no visible key (cannot happen causally, but guard anyway) give zeros.
    probs = jnp.where(mask[:, None, None].any(-1, keepdims=True), probs, 0.0)
    out = jnp.einsum("bhgqk,bkhd->bqhgd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.reshape(B, T, Hq, D).astype(q.dtype)


# =====================================================================================
# Pallas flash attention (Triton lowering; also runs under the Pallas interpreter).
#
# Layout inside the kernels: T is padded to a multiple of every block size, and each
# RoPE half of the head dim is zero-padded to P/2 (P = next power of two >= D), so the
# rotate-half pairing (x[c], x[c + P/2]) survives the padding and every tile is a
# power of two wide, as Triton needs. Tiles are handled as "parts": one [rows, P] part
# without RoPE, or the two rotated halves [rows, P/2] with RoPE, so that rotation never
# slices a register tile and q.k is a sum of one or two dots.
#
# Which (query block, key block) pairs are visited is decided outside the kernels, in
# plain jnp, from causal / window / padding / per-block segment id min-max: every
# kernel program reads four numbers (lo, a, b, hi) and runs blocks [lo, a) and [b, hi)
# with the mask and [a, b) without it. Blocks outside [lo, hi) are never touched.
# =====================================================================================

LOG2E = math.log2(math.e)
_PAD_SEGMENT = -(2**31)  # segment id of padding rows: real rows never see them


@dataclasses.dataclass(frozen=True)
class Tuning:
    """Block sizes and Triton launch parameters of the three kernels."""
    fwd_q: int = 128
    fwd_k: int = 64
    fwd_warps: int = 8
    fwd_stages: int = 3
    dq_q: int = 64
    dq_k: int = 64
    dkv_k: int = 64
    dkv_q: int = 64
    bwd_warps: int = 4
    bwd_stages: int = 2


def default_tuning(head_dim_padded: int) -> Tuning:
    if head_dim_padded <= 64:
        return Tuning(fwd_warps=4)
    if head_dim_padded <= 128:
        return Tuning()
    return Tuning(fwd_q=64, fwd_k=32, fwd_warps=4, fwd_stages=2, dq_q=32, dq_k=32, dkv_k=32, dkv_q=32)


@dataclasses.dataclass(frozen=True)
class _Cfg:
    """Static description of one call (hashable: it is a custom_vjp nondiff argument)."""
    seq_len: int          # real T
    seq_pad: int          # T after padding to the block sizes
    head_dim: int         # real D
    head_pad: int         # P
    num_groups: int       # Hq // Hkv
    causal: bool
    has_window: bool
    has_segments: bool
    rope: bool
    softcap: float | None
    scale: float
    tuning: Tuning
    interpret: bool

    @property
    def mask_kv_pad(self) -> bool:
        # Causal masking already hides padded keys from real queries; with segment ids the
        # padding segment does. Otherwise padded keys need their own mask.
        return self.seq_pad != self.seq_len and not self.causal and not self.has_segments

    @property
    def half(self) -> int:
        return self.head_pad // 2


# ----------------------------------------------------------------- in-kernel helpers

def _dot(a, b, *, trans_a=False, trans_b=False):
    """a @ b (optionally transposed operands) with float32 accumulation."""
    dims = (((0 if trans_a else 1,), (1 if trans_b else 0,)), ((), ()))
    return lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)


def _load_parts(read, cos, sin, cfg, dtype):
    """Read a Q or K tile as parts; with RoPE, the two rotated halves (HF rotate-half).

    `read(cols)` reads the tile's rows for a column slice; rotation is done in float32
    and rounded back to the input dtype, like the reference.
    """
    if not cfg.rope:
        return (read(slice(None)),)
    x1 = read(pl.ds(0, cfg.half)).astype(jnp.float32)
    x2 = read(pl.ds(cfg.half, cfg.half)).astype(jnp.float32)
    return ((x1 * cos - x2 * sin).astype(dtype), (x2 * cos + x1 * sin).astype(dtype))


def _store_parts(write, parts, cos, sin, cfg):
    """Write a gradient w.r.t. rotated Q/K back un-rotated (the transpose of RoPE)."""
    if not cfg.rope:
        write(slice(None), parts[0])
        return
    d1, d2 = parts
    write(pl.ds(0, cfg.half), d1 * cos + d2 * sin)
    write(pl.ds(cfg.half, cfg.half), d2 * cos - d1 * sin)


def _scores(a_parts, b_parts, cfg):
    """Scaled (and soft-capped) logits a . b^T in float32; also tanh for the softcap grad."""
    s = _dot(a_parts[0], b_parts[0], trans_b=True)
    for a, b in zip(a_parts[1:], b_parts[1:]):
        s = s + _dot(a, b, trans_b=True)
    s = s * cfg.scale
    t = None
    if cfg.softcap is not None:
        t = jnp.tanh(s / cfg.softcap)
        s = cfg.softcap * t
    return s, t


def _mask(q_idx, k_idx, seg_q, seg_k, window, cfg):
    """Which (query, key) pairs are visible; index/segment arguments broadcast together."""
    mask = None

    def both(m):
        return m if mask is None else mask & m

    if cfg.causal:
        mask = both(k_idx <= q_idx)
    if cfg.has_window:
        mask = both(q_idx - k_idx < window)
    if cfg.has_segments:
        mask = both(seg_q == seg_k)
    if cfg.mask_kv_pad:
        mask = both((k_idx < cfg.seq_len) | (q_idx >= cfg.seq_len))
    return mask


def _three_loops(ranges_ref, body, carry):
    """Masked blocks [lo, a), unmasked [a, b), masked [b, hi) (see _block_ranges)."""
    lo, a, b, hi = ranges_ref[0], ranges_ref[1], ranges_ref[2], ranges_ref[3]
    carry = lax.fori_loop(lo, a, functools.partial(body, masked=True), carry)
    carry = lax.fori_loop(a, b, functools.partial(body, masked=False), carry)
    return lax.fori_loop(b, hi, functools.partial(body, masked=True), carry)


def _unpack(refs, cfg, names):
    """Name the kernel's refs; optional inputs (window, cos/sin, segments) only when used."""
    present = []
    for name in names:
        if name == "window" and not cfg.has_window:
            continue
        if name in ("cos", "sin") and not cfg.rope:
            continue
        if name == "seg" and not cfg.has_segments:
            continue
        present.append(name)
    assert len(present) == len(refs), (present, len(refs))
    out = dict.fromkeys(("window", "cos", "sin", "seg"))
    out.update(zip(present, refs))
    return out


def _rope_rows(r, rows, cfg):
    if not cfg.rope:
        return None, None
    return r["cos"][rows, :], r["sin"][rows, :]


# ----------------------------------------------------------------- forward kernel

_FWD_NAMES = ("ranges", "q", "k", "v", "window", "cos", "sin", "seg", "o", "lse")


def _fwd_kernel(*refs, cfg, nq):
    r = _unpack(refs, cfg, _FWD_NAMES)
    bq, bk = cfg.tuning.fwd_q, cfg.tuning.fwd_k
    i = nq - 1 - pl.program_id(0)  # heaviest (last) causal query blocks start first
    q_rows = pl.ds(pl.multiple_of(i * bq, bq), bq)
    cos, sin = _rope_rows(r, q_rows, cfg)
    q_parts = _load_parts(lambda c: r["q"][:, c], cos, sin, cfg, r["q"].dtype)
    q_idx = (i * bq + jnp.arange(bq))[:, None]
    seg_q = r["seg"][q_rows][:, None] if cfg.has_segments else None
    window = r["window"][0] if cfg.has_window else None

    def body(j, carry, masked):
        acc, m, l = carry
        k_rows = pl.ds(pl.multiple_of(j * bk, bk), bk)
        kcos, ksin = _rope_rows(r, k_rows, cfg)
        k_parts = _load_parts(lambda c: r["k"][k_rows, c], kcos, ksin, cfg, r["k"].dtype)
        s, _ = _scores(q_parts, k_parts, cfg)
        if masked:
            k_idx = (j * bk + jnp.arange(bk))[None, :]
            seg_k = r["seg"][k_rows][None, :] if cfg.has_segments else None
            s = jnp.where(_mask(q_idx, k_idx, seg_q, seg_k, window, cfg), s, NEG_INF)
        s = s * LOG2E
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        # A row whose every key so far was masked has m == NEG_INF * LOG2E and picks up junk
        # here; alpha == 0 wipes it as soon as the row's first visible key arrives (each
        # row sees at least its own key, and that block is always visited).
        alpha = jnp.exp2(m - m_new)
        p = jnp.exp2(s - m_new[:, None])
        v = r["v"][k_rows, :]
        acc = acc * alpha[:, None] + _dot(p.astype(v.dtype), v)
        return acc, m_new, l * alpha + jnp.sum(p, axis=1)

    carry = (jnp.zeros((bq, cfg.head_pad), jnp.float32),
             jnp.full((bq,), NEG_INF * LOG2E, jnp.float32),
             jnp.zeros((bq,), jnp.float32))
    acc, m, l = _three_loops(r["ranges"], body, carry)
    r["o"][...] = (acc / l[:, None]).astype(r["o"].dtype)
    r["lse"][...] = m + jnp.log2(l)  # base-2 logsumexp of the scaled logits


# ----------------------------------------------------------------- dq kernel

_DQ_NAMES = ("ranges", "q", "k", "v", "do", "lse", "delta", "window", "cos", "sin", "seg", "dq")


def _dq_kernel(*refs, cfg, nq):
    r = _unpack(refs, cfg, _DQ_NAMES)
    bq, bk = cfg.tuning.dq_q, cfg.tuning.dq_k
    i = nq - 1 - pl.program_id(0)
    q_rows = pl.ds(pl.multiple_of(i * bq, bq), bq)
    cos, sin = _rope_rows(r, q_rows, cfg)
    q_parts = _load_parts(lambda c: r["q"][:, c], cos, sin, cfg, r["q"].dtype)
    do = r["do"][...]
    lse = r["lse"][...][:, None]
    delta = r["delta"][...][:, None]
    q_idx = (i * bq + jnp.arange(bq))[:, None]
    seg_q = r["seg"][q_rows][:, None] if cfg.has_segments else None
    window = r["window"][0] if cfg.has_window else None

    def body(j, dq_parts, masked):
        k_rows = pl.ds(pl.multiple_of(j * bk, bk), bk)
        kcos, ksin = _rope_rows(r, k_rows, cfg)
        k_parts = _load_parts(lambda c: r["k"][k_rows, c], kcos, ksin, cfg, r["k"].dtype)
        s, t = _scores(q_parts, k_parts, cfg)
        if masked:
            k_idx = (j * bk + jnp.arange(bk))[None, :]
            seg_k = r["seg"][k_rows][None, :] if cfg.has_segments else None
            s = jnp.where(_mask(q_idx, k_idx, seg_q, seg_k, window, cfg), s, NEG_INF)
        p = jnp.exp2(s * LOG2E - lse)
        ds = _dlogits(p, _dot(do, r["v"][k_rows, :], trans_b=True), delta, t, cfg)
        ds = ds.astype(r["k"].dtype)
        return tuple(acc + _dot(ds, kp) for acc, kp in zip(dq_parts, k_parts))

    width = cfg.half if cfg.rope else cfg.head_pad
    init = tuple(jnp.zeros((bq, width), jnp.float32) for _ in range(2 if cfg.rope else 1))
    dq_parts = _three_loops(r["ranges"], body, init)

    def write(cols, x):
        r["dq"][:, cols] = x.astype(r["dq"].dtype)

    _store_parts(write, dq_parts, cos, sin, cfg)


def _dlogits(p, dp, delta, t, cfg):
    """d loss / d (q.k) from probabilities p and dp = dO . V^T (softmax, softcap, scale)."""
    ds = p * (dp - delta)
    if cfg.softcap is not None:
        ds = ds * (1.0 - t * t)
    return ds * cfg.scale


# ----------------------------------------------------------------- dk/dv kernel

_DKV_NAMES = ("ranges", "q", "k", "v", "do", "lse", "delta", "window", "cos", "sin", "seg",
              "dk", "dv")


def _dkv_kernel(*refs, cfg):
    """One key block of one kv head; loops over the query heads of its group (GQA)."""
    r = _unpack(refs, cfg, _DKV_NAMES)
    bk, bq = cfg.tuning.dkv_k, cfg.tuning.dkv_q
    j = pl.program_id(0)
    k_rows = pl.ds(pl.multiple_of(j * bk, bk), bk)
    kcos, ksin = _rope_rows(r, k_rows, cfg)
    k_parts = _load_parts(lambda c: r["k"][:, c], kcos, ksin, cfg, r["k"].dtype)
    v = r["v"][...]
    # Scores are computed transposed, [keys, queries], so that the dV and dK updates are
    # plain (untransposed) products.
    k_idx = (j * bk + jnp.arange(bk))[:, None]
    seg_k = r["seg"][k_rows][:, None] if cfg.has_segments else None
    window = r["window"][0] if cfg.has_window else None

    def head_body(g, carry):
        def body(i, carry, masked):
            dk_parts, dv = carry
            q_rows = pl.ds(pl.multiple_of(i * bq, bq), bq)
            qcos, qsin = _rope_rows(r, q_rows, cfg)
            q_parts = _load_parts(lambda c: r["q"][q_rows, g, c], qcos, qsin, cfg, r["q"].dtype)
            do = r["do"][q_rows, g, :]
            lse = r["lse"][g, q_rows][None, :]
            delta = r["delta"][g, q_rows][None, :]
            s_t, t_t = _scores(k_parts, q_parts, cfg)
            if masked:
                q_idx = (i * bq + jnp.arange(bq))[None, :]
                seg_q = r["seg"][q_rows][None, :] if cfg.has_segments else None
                s_t = jnp.where(_mask(q_idx, k_idx, seg_q, seg_k, window, cfg), s_t, NEG_INF)
            p_t = jnp.exp2(s_t * LOG2E - lse)
            dv = dv + _dot(p_t.astype(do.dtype), do)
            ds_t = _dlogits(p_t, _dot(v, do, trans_b=True), delta, t_t, cfg)
            ds_t = ds_t.astype(r["q"].dtype)
            return tuple(acc + _dot(ds_t, qp) for acc, qp in zip(dk_parts, q_parts)), dv

        return _three_loops(r["ranges"], body, carry)

    width = cfg.half if cfg.rope else cfg.head_pad
    dk_init = tuple(jnp.zeros((bk, width), jnp.float32) for _ in range(2 if cfg.rope else 1))
    dv_init = jnp.zeros((bk, cfg.head_pad), jnp.float32)
    dk_parts, dv = lax.fori_loop(0, cfg.num_groups, head_body, (dk_init, dv_init))

    def write(cols, x):
        r["dk"][:, cols] = x.astype(r["dk"].dtype)

    _store_parts(write, dk_parts, kcos, ksin, cfg)
    r["dv"][...] = dv.astype(r["dv"].dtype)


# ----------------------------------------------------------------- block ranges (jnp)

def _block_ranges(cfg, bq, bk, aux, by_key):
    """int32 [Bs, n, 4] (lo, a, b, hi) per query block (or per key block if by_key).

    A block pair is visited if any pair in it may be visible (causal, window, key padding,
    overlapping per-block segment id ranges) and is "full" (no mask needed) if all pairs
    in it are visible. [a, b) is the first run of full blocks, so everything in it really
    is full even if segment ids repeat non-contiguously.
    """
    T, Tp = cfg.seq_len, cfg.seq_pad
    nq, nk = Tp // bq, Tp // bk
    q0 = (jnp.arange(nq) * bq)[:, None]
    q1 = q0 + bq - 1
    k0 = (jnp.arange(nk) * bk)[None, :]
    k1 = k0 + bk - 1
    any_vis = jnp.ones((nq, nk), bool)
    full = jnp.ones((nq, nk), bool)
    if cfg.causal:
        any_vis &= k0 <= q1
        full &= k1 <= q0
    if cfg.has_window:
        w = aux["window"][0]
        any_vis &= q0 - k1 < w
        full &= q1 - k0 < w
    if cfg.mask_kv_pad:
        any_vis &= (k0 < T) | (q1 >= T)
        full &= k1 < T
    any_vis, full = any_vis[None], full[None]
    if cfg.has_segments:
        seg = aux["seg"]
        B = seg.shape[0]
        sq, sk = seg.reshape(B, nq, bq), seg.reshape(B, nk, bk)
        qmin, qmax = sq.min(-1)[:, :, None], sq.max(-1)[:, :, None]
        kmin, kmax = sk.min(-1)[:, None, :], sk.max(-1)[:, None, :]
        any_vis = any_vis & (kmin <= qmax) & (kmax >= qmin)
        full = full & (qmin == qmax) & (kmin == kmax) & (qmin == kmin)
    if by_key:
        any_vis, full = any_vis.transpose(0, 2, 1), full.transpose(0, 2, 1)
    n = any_vis.shape[-1]
    idx = jnp.arange(n)
    lo = jnp.min(jnp.where(any_vis, idx, n), axis=-1)
    hi = jnp.max(jnp.where(any_vis, idx + 1, 0), axis=-1)
    lo = jnp.minimum(lo, hi)  # no visible block at all: empty range
    a = jnp.min(jnp.where(full, idx, n), axis=-1)
    b = jnp.min(jnp.where(~full & (idx >= a[..., None]), idx, n), axis=-1)
    has_full = a < n
    a = jnp.where(has_full, a, lo)
    b = jnp.where(has_full, b, lo)
    return jnp.stack([lo, a, b, hi], axis=-1).astype(jnp.int32)


# ----------------------------------------------------------------- pallas_call builders

def _compiler_params(warps, stages, interpret):
    if interpret:
        return None
    from unsloth_jax.compat import triton_compiler_params

    return triton_compiler_params(num_warps=warps, num_stages=stages)


def _aux_specs(cfg, aux, grid_b):
    """BlockSpecs + operands for the optional inputs; `grid_b(idx)` picks the batch index."""
    specs, ops = [], []
    Tp, half = cfg.seq_pad, cfg.half
    if cfg.has_window:
        specs.append(pl.BlockSpec((1,), lambda *_: (0,)))
        ops.append(aux["window"])
    if cfg.rope:
        per_batch = aux["cos"].shape[0] > 1
        spec = pl.BlockSpec((None, Tp, half),
                            lambda *ix: (grid_b(ix) if per_batch else 0, 0, 0))
        specs += [spec, spec]
        ops += [aux["cos"], aux["sin"]]
    if cfg.has_segments:
        specs.append(pl.BlockSpec((None, Tp), lambda *ix: (grid_b(ix), 0)))
        ops.append(aux["seg"])
    return specs, ops


def _ranges_spec(ranges, block_of):
    per_batch = ranges.shape[0] > 1
    return pl.BlockSpec((None, None, 4),
                        lambda i, b, h: (b if per_batch else 0, block_of(i), 0))


def _forward(cfg, q, k, v, aux):
    """Padded q/k/v -> padded out [B, Tp, Hq, P] and base-2 lse [B, Hq, Tp]."""
    B, Tp, Hq, P = q.shape
    tn = cfg.tuning
    bq, bk, G = tn.fwd_q, tn.fwd_k, cfg.num_groups
    nq = Tp // bq
    rev = lambda i: nq - 1 - i  # noqa: E731  (matches the kernel's block order)
    ranges = _block_ranges(cfg, bq, bk, aux, by_key=False)
    q_spec = pl.BlockSpec((None, bq, None, P), lambda i, b, h: (b, rev(i), h, 0))
    kv_spec = pl.BlockSpec((None, Tp, None, P), lambda i, b, h: (b, 0, h // G, 0))
    aux_specs, aux_ops = _aux_specs(cfg, aux, lambda ix: ix[1])
    return pl.pallas_call(
        functools.partial(_fwd_kernel, cfg=cfg, nq=nq),
        grid=(nq, B, Hq),
        in_specs=[_ranges_spec(ranges, rev), q_spec, kv_spec, kv_spec, *aux_specs],
        out_specs=[q_spec, pl.BlockSpec((None, None, bq), lambda i, b, h: (b, h, rev(i)))],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                   jax.ShapeDtypeStruct((B, Hq, Tp), jnp.float32)],
        compiler_params=_compiler_params(tn.fwd_warps, tn.fwd_stages, cfg.interpret),
        interpret=cfg.interpret,
        name="flash_attention_fwd",
    )(ranges, q, k, v, *aux_ops)


def _backward(cfg, q, k, v, aux, do, lse, delta):
    """Padded inputs -> padded dq, dk, dv."""
    B, Tp, Hq, P = q.shape
    Hkv = k.shape[2]
    tn, G = cfg.tuning, cfg.num_groups
    params = _compiler_params(tn.bwd_warps, tn.bwd_stages, cfg.interpret)

    # dq: one program per (query block, batch, query head), like the forward.
    bq, bk = tn.dq_q, tn.dq_k
    nq = Tp // bq
    rev = lambda i: nq - 1 - i  # noqa: E731
    ranges = _block_ranges(cfg, bq, bk, aux, by_key=False)
    q_spec = pl.BlockSpec((None, bq, None, P), lambda i, b, h: (b, rev(i), h, 0))
    kv_spec = pl.BlockSpec((None, Tp, None, P), lambda i, b, h: (b, 0, h // G, 0))
    row_spec = pl.BlockSpec((None, None, bq), lambda i, b, h: (b, h, rev(i)))
    aux_specs, aux_ops = _aux_specs(cfg, aux, lambda ix: ix[1])
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, cfg=cfg, nq=nq),
        grid=(nq, B, Hq),
        in_specs=[_ranges_spec(ranges, rev), q_spec, kv_spec, kv_spec, q_spec, row_spec,
                  row_spec, *aux_specs],
        out_specs=q_spec,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=params,
        interpret=cfg.interpret,
        name="flash_attention_dq",
    )(ranges, q, k, v, do, lse, delta, *aux_ops)

    # dk/dv: one program per (key block, batch, kv head); it loops over the group's query
    # heads, so K/V are never repeated and dk/dv need no atomics.
    bk, bq = tn.dkv_k, tn.dkv_q
    nk = Tp // bk
    ranges = _block_ranges(cfg, bq, bk, aux, by_key=True)
    kv_spec = pl.BlockSpec((None, bk, None, P), lambda j, b, h: (b, j, h, 0))
    qg_spec = pl.BlockSpec((None, Tp, G, P), lambda j, b, h: (b, 0, h, 0))
    rowg_spec = pl.BlockSpec((None, G, Tp), lambda j, b, h: (b, h, 0))
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, cfg=cfg),
        grid=(nk, B, Hkv),
        in_specs=[_ranges_spec(ranges, lambda j: j), qg_spec, kv_spec, kv_spec, qg_spec,
                  rowg_spec, rowg_spec, *aux_specs],
        out_specs=[kv_spec, kv_spec],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=params,
        interpret=cfg.interpret,
        name="flash_attention_dkv",
    )(ranges, q, k, v, do, lse, delta, *aux_ops)
    return dq, dk, dv


# ----------------------------------------------------------------- padding

def _pad(x, cfg):
    """[B, T, H, D] -> [B, Tp, H, P], each RoPE half zero-padded to P/2."""
    B, T, H, D = x.shape
    if (T, D) == (cfg.seq_pad, cfg.head_pad):
        return x
    x = x.reshape(B, T, H, 2, D // 2)
    x = jnp.pad(x, ((0, 0), (0, cfg.seq_pad - T), (0, 0), (0, 0), (0, (cfg.head_pad - D) // 2)))
    return x.reshape(B, cfg.seq_pad, H, cfg.head_pad)


def _unpad(x, cfg):
    B, Tp, H, P = x.shape
    if (Tp, P) == (cfg.seq_len, cfg.head_dim):
        return x
    x = x[:, : cfg.seq_len].reshape(B, cfg.seq_len, H, 2, P // 2)[..., : cfg.head_dim // 2]
    return x.reshape(B, cfg.seq_len, H, cfg.head_dim)


def _pad_rows(x, cfg, value=0):
    """Pad axis 1 (time) of [B, T, ...] to Tp."""
    widths = [(0, 0)] * x.ndim
    widths[1] = (0, cfg.seq_pad - cfg.seq_len)
    return jnp.pad(x, widths, constant_values=value)


# ----------------------------------------------------------------- custom_vjp

@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(cfg, q, k, v, aux):
    return _flash_fwd(cfg, q, k, v, aux)[0]


def _flash_fwd(cfg, q, k, v, aux):
    out, lse = _forward(cfg, _pad(q, cfg), _pad(k, cfg), _pad(v, cfg), aux)
    out = _unpad(out, cfg)
    return out, (q, k, v, aux, out, lse)


def _flash_bwd(cfg, res, dout):
    q, k, v, aux, out, lse = res
    # delta_i = sum_d dO * O: the softmax-gradient row term, a cheap fused XLA reduction.
    delta = jnp.sum(dout.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)
    delta = _pad_rows(delta, cfg).transpose(0, 2, 1)
    dq, dk, dv = _backward(cfg, _pad(q, cfg), _pad(k, cfg), _pad(v, cfg), aux,
                           _pad(dout.astype(q.dtype), cfg), lse, delta)
    aux_ct = jax.tree_util.tree_map(_zero_cotangent, aux)
    return _unpad(dq, cfg), _unpad(dk, cfg), _unpad(dv, cfg), aux_ct


def _zero_cotangent(x):
    if jnp.issubdtype(x.dtype, jnp.integer):
        return np.zeros(x.shape, jax.dtypes.float0)
    return jnp.zeros_like(x)


_flash.defvjp(_flash_fwd, _flash_bwd)


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def flash_attention(q, k, v, *, positions=None, segment_ids=None, inv_freq=None, causal=True,
                    sliding_window=None, logit_softcap=None, scale=None, interpret=False,
                    block_q=None, block_k=None, tuning=None):
    """Flash attention with RoPE inside the kernels; same semantics as the reference.

    Differentiable w.r.t. q, k, v (not inv_freq). `block_q`/`block_k` override the block
    sizes of all three kernels (powers of two >= 16); `tuning` sets them individually.
    sliding_window may be a traced int scalar (>= 1), e.g. per layer inside a scan.
    """
    B, T, Hq, D = q.shape
    Hkv = k.shape[2]
    if k.shape != (B, T, Hkv, D) or v.shape != k.shape or Hq % Hkv or D % 2:
        raise ValueError(f"flash_attention: bad shapes q={q.shape} k={k.shape} v={v.shape}")
    P = max(32, _next_pow2(D))
    tn = tuning or default_tuning(P)
    if block_q is not None or block_k is not None:
        bq = block_q or block_k
        bk = block_k or block_q
        tn = dataclasses.replace(tn, fwd_q=bq, fwd_k=bk, dq_q=bq, dq_k=bk, dkv_q=bq, dkv_k=bk)
    # Short sequences: shrink blocks so padding stays below 2x (never under 16, Triton's
    # smallest dot).
    cap = max(16, _next_pow2(T))
    tn = dataclasses.replace(tn, **{f.name: min(getattr(tn, f.name), cap)
                                    for f in dataclasses.fields(tn) if f.name[-2:] in ("_q", "_k")})
    step = max(tn.fwd_q, tn.fwd_k, tn.dq_q, tn.dq_k, tn.dkv_q, tn.dkv_k)
    Tp = -(-T // step) * step
    cfg = _Cfg(seq_len=T, seq_pad=Tp, head_dim=D, head_pad=P, num_groups=Hq // Hkv,
               causal=bool(causal), has_window=sliding_window is not None,
               has_segments=segment_ids is not None, rope=inv_freq is not None,
               softcap=None if logit_softcap is None else float(logit_softcap),
               scale=float(D ** -0.5 if scale is None else scale), tuning=tn,
               interpret=bool(interpret))
    aux = {}
    if cfg.has_window:
        aux["window"] = jnp.asarray(sliding_window, jnp.int32).reshape(1)
    if cfg.rope:
        pos = jnp.arange(T)[None] if positions is None else positions
        pos = _pad_rows(pos, cfg)
        freq = jnp.pad(inv_freq.astype(jnp.float32), (0, P // 2 - D // 2))
        angles = pos.astype(jnp.float32)[..., None] * freq  # same arithmetic as rope_cos_sin
        aux["cos"], aux["sin"] = jnp.cos(angles), jnp.sin(angles)
    if cfg.has_segments:
        aux["seg"] = _pad_rows(segment_ids.astype(jnp.int32), cfg, _PAD_SEGMENT)
    return _flash(cfg, q, k, v, aux)


def attention(q, k, v, **kw):
    """The model's entry point: picks the implementation by UNSLOTH_JAX_KERNELS / backend."""
    from unsloth_jax.compat import kernel_mode

    mode = kernel_mode()
    if mode == "reference":
        return flash_attention_reference(q, k, v, **kw)
    return flash_attention(q, k, v, interpret=(mode == "interpret"), **kw)
