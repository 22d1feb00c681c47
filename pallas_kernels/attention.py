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

`flash_attention` is the Pallas version (custom_vjp, forward + dq + dk/dv kernels, RoPE
inside, no O(T^2) buffers); `attention` dispatches between the two by
UNSLOTH_JAX_KERNELS (see unsloth_jax.compat.kernel_mode).
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

from pallas_kernels import attention_mosaic, attention_mosaic_dkv, attention_mosaic_dkv_wide, attention_mosaic_dq

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
    mask = attention_mask(T, T, segment_ids, segment_ids, causal, sliding_window)
    return masked_attention(q, k, v, mask, scale=scale, logit_softcap=logit_softcap)


def masked_attention(q, k, v, mask, *, scale, logit_softcap=None):
    """q [B, T, Hq, D] over k/v [B, S, Hkv, D] (GQA without repeating K/V) where mask [B or 1, T, S]
    is true; softmax in float32. Shared by the reference and the KV-cache decode."""
    B, T, Hq, D = q.shape
    Hkv = k.shape[2]
    qg = q.reshape(B, T, Hkv, Hq // Hkv, D)
    scores = jnp.einsum("bqhgd,bkhd->bhgqk", qg, k, preferred_element_type=jnp.float32) * scale
    if logit_softcap is not None:
        scores = logit_softcap * jnp.tanh(scores / logit_softcap)
    scores = jnp.where(mask[:, None, None], scores, NEG_INF)
    probs = jax.nn.softmax(scores, axis=-1)
    # Rows with no visible key (cannot happen causally, but guard anyway) give zeros.
    probs = jnp.where(mask[:, None, None].any(-1, keepdims=True), probs, 0.0)
    out = jnp.einsum("bhgqk,bkhd->bqhgd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.reshape(B, T, Hq, D).astype(q.dtype)


# =====================================================================================
# Pallas flash attention (Triton lowering; also runs under the Pallas interpreter).
#
# Layout inside the kernels:
# - T is padded to a multiple of every block size; each RoPE half of the head dim is
#   zero-padded to P/2 (P = next power of two >= D), so the rotate-half pairing
#   (x[c], x[c + P/2]) survives the padding and every tile is a power of two wide.
# - Q/K tiles are handled as "parts": one [rows, P] part without RoPE, or the two rotated
#   halves [rows, P/2] with RoPE, so rotation never slices a register tile and q.k is a
#   sum of one or two dots. Rotation uses cos/sin tables [T, P/2] made from positions and
#   inv_freq outside (O(T*D), the same numbers as the reference's; stored as float16
#   for 16-bit inputs, see Tuning.rope_table_dtype).
# - GQA packing: the `pack` query heads of a group that share a kv head are stacked into
#   the rows of one query tile (rows = position-major (t, head) pairs), so each K/V tile is
#   loaded and rotated once for all of them. K/V are never repeated in memory.
# - Which (query block, key block) pairs are visited is decided outside the kernels, in
#   plain jnp, from causal / window / padding / per-block segment id min-max: each kernel
#   program reads four numbers (lo, a, b, hi) and runs blocks [lo, a) and [b, hi) with the
#   mask and [a, b) without it. Blocks outside [lo, hi) are never touched.
# - lse and delta (softmax row statistics) are float32 [B, Tp, Hq].
# =====================================================================================

LOG2E = math.log2(math.e)
_PAD_SEGMENT = -(2**31)  # segment id of padding rows: real rows never see them


@dataclasses.dataclass(frozen=True)
class Tuning:
    """Block sizes (in tile rows, i.e. positions x packed heads for queries) and Triton
    launch parameters of the three kernels; pack=None picks the GQA packing."""
    fwd_q: int = 128
    fwd_k: int = 64
    fwd_warps: int = 8
    fwd_stages: int = 3
    dq_q: int = 128
    dq_k: int = 64
    dq_warps: int = 8
    dkv_k: int = 128
    dkv_q: int = 64
    dkv_warps: int = 8
    bwd_stages: int = 3
    pack: int | None = None
    # Storage of the RoPE cos/sin tables for 16-bit inputs. The kernels stream a table tile
    # with every K (or Q) tile, so float16 halves those bytes; its rounding (2^-12 absolute)
    # is far below the bf16 rounding of the rotated q/k. float32 inputs always use float32.
    rope_table_dtype: str = "float16"
    # The Mosaic GPU kernels (attention_mosaic*.py) where they apply on an sm_90 GPU: None = yes
    # when available, False = always the Triton kernels (forward and backward).
    mosaic_fwd: bool | None = None
    # dq and dk/dv as the Mosaic GPU kernels (attention_mosaic_dq.py, _dkv.py) where the Mosaic
    # forward runs: None = yes, False = the Triton kernel (fed the Mosaic lse).
    mosaic_dq: bool | None = None
    mosaic_dkv: bool | None = None
    # Packed rows (segment ids) on the Mosaic kernels too (they skip the key tiles of other
    # documents). False = packed rows take the Triton kernels. GPU-checked and timed by
    # `bench_attention.py --packed` (attention_NOTES.md session 6).
    mosaic_packed: bool = True
    # Where RoPE is applied. True: inside the kernels, to the Q/K tiles in shared memory (rotated
    # Q/K never in device memory). False: by XLA before the kernels (one fused elementwise pass
    # over q and k; autodiff un-rotates dq/dk), the kernels then run without tables. None = False
    # where the Mosaic kernels run: there the in-kernel rotation costs 23-24% of fwd+bwd (each K
    # tile is rotated once per query head and query tile that reads it, each Q tile once per key
    # block in dk/dv) against ~2% for XLA's pass (H200, attention_NOTES.md session 6); the rotated
    # copies are transient, the custom_vjp keeps them instead of q/k. True wherever a Triton
    # kernel runs (not measured there this way; its dk/dv kernel then takes unit tables).
    rope_in_kernel: bool | None = None
    # With RoPE by XLA before the Mosaic kernels (rope_in_kernel False there): the rotation runs
    # inside the custom_vjp and the Mosaic dq / dk-dv kernels un-rotate dq / dk in their epilogues
    # (cos/sin tables of their own rows only), instead of autodiff's separate pass over dq and dk
    # (0.11 + 0.03 ms of 2.5 ms fwd+bwd at 2k). Off: on the H200 (Nsight Compute, RESULTS.md
    # 000000000000) it saves 1.5% at 2k but costs 1.0% at 8k, the dq kernel with its tables
    # running 0.82x / 0.94x as fast (not understood yet: its loop is the same code).
    rope_grad_in_kernel: bool = False
    # The Mosaic kernels' launch order. True: the heaviest causal blocks first (attention_mosaic.
    # cta_grid); against the old head-major order (False) on the H200: fwd+bwd 2-3% faster at 8k in
    # two calls, within noise at 2k and 32k, the forward kernel 4.8% at 2k (attention_NOTES.md session 7).
    mosaic_longest_first: bool = True
    # The fused Mosaic backward: dq from the dk/dv kernel's dS tiles, reduce-added in fp32
    # (attention_mosaic_dkv with_dq; 5 GEMMs per tile pair instead of 7), where both Mosaic
    # backward kernels run without RoPE tables. None: from FUSED_BWD_MIN_T positions on. On the
    # H200 (session 18, static consumers) the backward kernels alone ran 0.87x / 1.04x / 1.11x the
    # separate kernels' speed at 2k / 8k / 32k; end to end at 8k the separate kernels were still
    # ahead (7.94 against 8.32 ms), at 16k / 32k fused was (before static consumers already 0.98x
    # the time). FA3's order (dQ wgmmas before dK) and double-buffered dQ staging were tried and
    # removed (attention_NOTES.md sessions 9-18).
    mosaic_fused_bwd: bool | None = None
    # The Mosaic dk/dv (and fused) kernel with each consumer warpgroup's code specialised to its
    # buffer index (attention_mosaic_dkv static_consumers: wgmma descriptors as immediates
    # instead of registers that the fused kernel spilled). Kernels alone on the H200 (session 18):
    # dk/dv 1.02x / 1.03x / 1.01x, fused 1.09x / 1.11x / 1.09x at 2k / 8k / 32k.
    mosaic_dkv_static_consumers: bool = True
    # The same for the Mosaic dq kernel (its Q / dO buffers by consumer index). On the H200
    # (session 19) 1.03x / 1.00x / 0.96x at 2k / 8k / 32k: off.
    mosaic_dq_static_consumers: bool = False
    # The Mosaic dk/dv kernel loading each step's lse / delta rows before its S^T wgmmas
    # (attention_mosaic_dkv rows_early). None: in the separate dk/dv kernel, not in the fused one.
    # Fwd+bwd on the H100 (2026-12-07, attention_NOTES.md session 22): separate dk/dv 2-6% faster
    # at 8k (three timings against three of the default), 2.7% at 32k; fused 13% / 3-5% / 3.5% slower
    # at 8k / 16k / 32k.
    mosaic_dkv_rows_early: bool | None = None
    # The fused backward without Pallas' warpgroup barriers around its shared-memory stores
    # (attention_mosaic_dkv no_auto_barriers; why that is safe there: its docstring). Fwd+bwd on the
    # H100 in paired rounds (2026-12-07, attention_NOTES.md session 23): 1.025x against 1.051x
    # cuDNN's time at 16k (faster in 11 of 12 rounds), 1.015x against 1.048x at 32k (8 of 10), as
    # in sessions 22 / 23's shorter runs at 32k (2.1%, 1.7%).
    mosaic_fused_no_auto_barriers: bool = True
    # Extra launch settings of the Mosaic dk/dv kernel, separate or fused (attention_mosaic_dkv.
    # mosaic_dkv keywords as (name, value) pairs, e.g. (("rows_early", True),), over the settings
    # above), for A/B runs of variants not yet default.
    mosaic_dkv_kwargs: tuple = ()
    # The same for the Mosaic forward and dq kernels (attention_mosaic.mosaic_forward /
    # attention_mosaic_dq.mosaic_dq keywords, over the settings flash_attention derives), for A/B runs.
    mosaic_fwd_kwargs: tuple = ()
    mosaic_dq_kwargs: tuple = ()
    # The Mosaic forward as a persistent kernel (one CTA per SM looping over query tiles, the next
    # tile's K/V and Q loaded under the last one's epilogue; attention_mosaic.QTiles) where it runs
    # without RoPE tables. The forward kernel alone on the H200: 1.07x at 2k, 1.01x at 8k (same
    # process, attention_NOTES.md session 10); with tables 1.04x / 0.97x, so not there.
    mosaic_persistent_fwd: bool = True
    # Keys per step of the Mosaic forward without RoPE tables: 64, or 128 (2 stages; half the steps
    # and their fixed work, QK^T at N = 128 as tokamax's forward). 128 on the H200, persistent, the
    # kernel alone in one process: 1.10x at 2k, 1.11x at 8k; the forward at 32k 18.46 -> 16.94 ms
    # (attention_NOTES.md session 11).
    mosaic_fwd_key_block: int = 128
    # With 128-key steps: the two consumers take turns on the tensor cores (ping-pong, FA3's
    # schedule), so one's softmax runs under the other's wgmmas. Measured equal to 128-key steps
    # without it (1.08x / 1.12x over 64-key steps against 1.10x / 1.11x, session 11): off.
    mosaic_fwd_pingpong: bool = False
    # The Mosaic forward's softmax keeps the row max in raw score units and applies scale * log2(e)
    # inside each exponent (one FFMA per score instead of a multiply and a subtract). The kernel
    # alone on the H200 in one process: 1.014x at 32k, 1.001x at 8k, 0.996x at 2k; the forward end
    # to end 16.82 -> 16.44 ms at 32k (attention_NOTES.md session 15).
    mosaic_fwd_fold_scale: bool = True
    # With 128-key steps, each step of the Mosaic forward issues the next step's QK^T right behind
    # its PV and waits for both at once (attention_mosaic.mosaic_forward(early_qk=True)); not with
    # ping-pong. The kernel alone on the H200 in one process: 1.020x at 2k, 0.999x at 8k, 1.095x at
    # 32k; the forward end to end 16.73 -> 15.59 ms at 32k. With RoPE tables (64-key steps) it ran
    # 0.80-0.88x, so not there (attention_NOTES.md session 17).
    mosaic_fwd_early_qk: bool = True
    # The persistent Mosaic forward's tile order: None, longest first over every (batch row, head);
    # an int, longest first within chunks of that many query heads of one batch row, chunk by
    # chunk (attention_mosaic.QTiles head_chunk), so that the K/V the CTAs read at once stay in L2.
    # Rounded down to whole GQA groups that divide the heads (one group at least). Opt-in: with the
    # list schedule below, level with the default at 2k / 8k on the H100 (one call, attention_NOTES.md
    # session 25); 32k not yet timed.
    mosaic_fwd_head_chunk: int | None = None
    # How the persistent Mosaic forward hands its tiles (in the order above) to the CTAs: "snake",
    # round by round (attention_mosaic.QTiles), or "list", a list schedule of each tile to the CTA
    # whose modelled work ends first, read from a table (benchmarks/launch_order_model.py: the snake
    # at 1.031x the ideal at 2k and 1.10-1.24x with chunks of 8 heads at 8k-16k, the list schedule at
    # 1.001-1.009x). Opt-in: GPU-checked, level with the snake at 2k / 8k in one H100 call (fwd+bwd
    # 0.942x / 0.973x cuDNN against 0.930x / 0.975x; attention_NOTES.md session 25).
    mosaic_fwd_schedule: str = "snake"
    # D = 256 (Gemma) on the Mosaic kernels: the forward and dq at D = 256, the wide dk/dv
    # (attention_mosaic_dkv_wide), RoPE by XLA; else the Triton kernels (2.9x cuDNN's fwd+bwd time,
    # RESULTS.md session 5). Opt-in until GPU-checked: built and checked on the CPU in session 26
    # (interpreter, CUDA lowering), when no GPU was lent; `bash benchmarks/run_session26.sh d256` checks
    # and times it.
    mosaic_wide_heads: bool = False
    # Sliding windows on the Mosaic kernels (every kernel takes the window; attention_NOTES.md session
    # 26); else a window shorter than T sends the call to the Triton kernels. Opt-in until
    # GPU-checked, as above. (A static window of at least T is dropped either way: it hides nothing.)
    mosaic_windows: bool = False
    # Logit softcaps (Gemma-2: c tanh(s / c)) on the Mosaic kernels (the scale applied before the
    # cap, dS times 1 - tanh^2); else the Triton kernels. Opt-in until GPU-checked, as above.
    mosaic_softcap: bool = False


def default_tuning(head_dim_padded: int, itemsize: int = 2) -> Tuning:
    """Per-shape defaults; each was compiled and checked on an H100 (attention_NOTES.md)."""
    if itemsize > 2:  # float32 tiles: a quarter of the shared memory per pipeline stage
        return Tuning(fwd_q=64, fwd_k=32, fwd_warps=4, fwd_stages=2, dq_q=64, dq_k=32,
                      dq_warps=4, dkv_k=32, dkv_q=32, dkv_warps=4, bwd_stages=2)
    if head_dim_padded > 128:  # D=256: thin key tiles, 8 warps (the D=256 sweep's fastest)
        return Tuning(fwd_q=128, fwd_k=32, fwd_warps=8, fwd_stages=2, dq_q=128, dq_k=32,
                      dq_warps=8, dkv_k=64, dkv_q=32, dkv_warps=8, bwd_stages=2)
    if head_dim_padded <= 64:
        return Tuning(fwd_warps=4, dq_q=128, dq_k=32, dq_warps=4, dkv_k=64, dkv_warps=4,
                      bwd_stages=2)
    return Tuning()  # the fastest of the H100 sweep for D=128


_BLOCK_FIELDS = ("fwd_q", "fwd_k", "dq_q", "dq_k", "dkv_k", "dkv_q")


@dataclasses.dataclass(frozen=True)
class _Cfg:
    """Static description of one call (hashable: it is a custom_vjp nondiff argument)."""
    seq_len: int          # real T
    seq_pad: int          # T after padding to the block sizes
    head_dim: int         # real D
    head_pad: int         # P
    num_groups: int       # Hq // Hkv
    pack: int             # query heads stacked into one tile (divides num_groups)
    causal: bool
    has_window: bool
    has_segments: bool
    rope: bool
    softcap: float | None
    scale: float
    tuning: Tuning
    interpret: bool
    mosaic_fwd: bool = False  # forward by attention_mosaic
    mosaic_dq: bool = False   # dq by attention_mosaic_dq (implies mosaic_fwd)
    mosaic_dkv: bool = False  # dk/dv by attention_mosaic_dkv (implies mosaic_fwd)
    rope_outside: bool = False  # XLA rotates q/k in the forward rule; the Mosaic backward un-rotates

    @property
    def mask_kv_pad(self) -> bool:
        # Causal masking already hides padded keys from real queries; with segment ids the
        # padding segment does. Otherwise padded keys need their own mask.
        return self.seq_pad != self.seq_len and not self.causal and not self.has_segments

    @property
    def half(self) -> int:
        return self.head_pad // 2

    @property
    def wide(self) -> bool:  # D = 256: the Mosaic kernels take no RoPE tables and use the wide dk/dv kernel
        return self.head_dim == attention_mosaic.WIDE_HEAD_DIM


# ----------------------------------------------------------------- in-kernel helpers

def _dot(a, b, *, trans_a=False, trans_b=False):
    """a @ b (optionally transposed operands) with float32 accumulation.

    float32 operands ask for HIGHEST precision: Triton's default for them is TF32 (~3e-4
    relative error), which would not match the float32 reference.
    """
    dims = (((0 if trans_a else 1,), (1 if trans_b else 0,)), ((), ()))
    precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


def _flat(x):
    """[positions, pack, w] -> [positions * pack, w] (position-major tile rows)."""
    return x.reshape(x.shape[0] * x.shape[1], *x.shape[2:]) if x.ndim == 3 else x


def _per_row(x, pack):
    """A per-position vector [n] -> per-tile-row [n * pack] (each position `pack` times)."""
    if pack == 1:
        return x
    return jnp.broadcast_to(x[:, None], (x.shape[0], pack)).reshape(x.shape[0] * pack)


def _load_parts(read, cos, sin, cfg, dtype):
    """Read a Q or K tile as parts; with RoPE, the two rotated halves (HF rotate-half).

    `read(cols)` gives [rows, w] or, for packed queries, [positions, pack, w]; cos/sin are
    [positions, P/2]. Rotation is done in float32 and rounded back to the input dtype,
    like the reference.
    """
    if not cfg.rope:
        return (_flat(read(slice(None))),)
    x1 = read(pl.ds(0, cfg.half)).astype(jnp.float32)
    x2 = read(pl.ds(cfg.half, cfg.half)).astype(jnp.float32)
    if x1.ndim == 3:
        cos, sin = cos[:, None, :], sin[:, None, :]
    return (_flat((x1 * cos - x2 * sin).astype(dtype)), _flat((x2 * cos + x1 * sin).astype(dtype)))


def _store_parts(write, parts, cos, sin, cfg, pack=None):
    """Write a gradient w.r.t. rotated Q/K back un-rotated (the transpose of RoPE).

    With `pack`, the [positions * pack, w] parts are written as [positions, pack, w].
    """
    def shaped(x):
        return x if pack is None else x.reshape(x.shape[0] // pack, pack, x.shape[1])

    if not cfg.rope:
        write(slice(None), shaped(parts[0]))
        return
    d1, d2 = (shaped(p) for p in parts)
    if pack is not None:
        cos, sin = cos[:, None, :], sin[:, None, :]
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


def _dlogits(p, dp, delta, t, cfg):
    """d loss / d (q.k) from probabilities p and dp = dO . V^T (softmax, softcap, scale)."""
    ds = p * (dp - delta)
    if cfg.softcap is not None:
        ds = ds * (1.0 - t * t)
    return ds * cfg.scale


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


class _Tile:
    """Row-indexed quantities of one block of positions: RoPE tables, positions, segments."""

    def __init__(self, r, start, n, cfg, pack=1):
        rows = pl.ds(pl.multiple_of(start, n), n)
        self.rows = rows
        self.cos = r["cos"][rows, :].astype(jnp.float32) if cfg.rope else None
        self.sin = r["sin"][rows, :].astype(jnp.float32) if cfg.rope else None
        self.idx = _per_row(start + jnp.arange(n), pack)
        self.seg = _per_row(r["seg"][rows], pack) if cfg.has_segments else None


def _masked_scores(s, q, k, window, cfg, keys_first=False):
    """Apply the mask to scores [q rows, k rows] (or [k rows, q rows] if keys_first)."""
    if keys_first:
        m = _mask(q.idx[None, :], k.idx[:, None],
                  None if q.seg is None else q.seg[None, :],
                  None if k.seg is None else k.seg[:, None], window, cfg)
    else:
        m = _mask(q.idx[:, None], k.idx[None, :],
                  None if q.seg is None else q.seg[:, None],
                  None if k.seg is None else k.seg[None, :], window, cfg)
    return jnp.where(m, s, NEG_INF)


# ----------------------------------------------------------------- forward kernel

_FWD_NAMES = ("ranges", "q", "k", "v", "window", "cos", "sin", "seg", "o", "lse")


def _fwd_kernel(*refs, cfg, nq):
    """One block of positions x `pack` query heads; loops over the visible key blocks."""
    r = _unpack(refs, cfg, _FWD_NAMES)
    pack = cfg.pack
    bqt, bk = cfg.tuning.fwd_q // pack, cfg.tuning.fwd_k
    i = nq - 1 - pl.program_id(0)  # heaviest (last) causal query blocks start first
    qt = _Tile(r, i * bqt, bqt, cfg, pack)
    q_parts = _load_parts(lambda c: r["q"][:, :, c], qt.cos, qt.sin, cfg, r["q"].dtype)
    window = r["window"][0] if cfg.has_window else None

    def body(j, carry, masked):
        acc, m, l = carry
        kt = _Tile(r, j * bk, bk, cfg)
        k_parts = _load_parts(lambda c: r["k"][kt.rows, c], kt.cos, kt.sin, cfg, r["k"].dtype)
        s, _ = _scores(q_parts, k_parts, cfg)
        if masked:
            s = _masked_scores(s, qt, kt, window, cfg)
        s = s * LOG2E
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        # A row whose every key so far was masked has m == NEG_INF * LOG2E and picks up junk
        # here; alpha == 0 wipes it as soon as the row's first visible key arrives (each
        # row sees at least its own key, and that block is always visited).
        alpha = jnp.exp2(m - m_new)
        p = jnp.exp2(s - m_new[:, None])
        v = r["v"][kt.rows, :]
        acc = acc * alpha[:, None] + _dot(p.astype(v.dtype), v)
        return acc, m_new, l * alpha + jnp.sum(p, axis=1)

    rows = bqt * pack
    carry = (jnp.zeros((rows, cfg.head_pad), jnp.float32),
             jnp.full((rows,), NEG_INF * LOG2E, jnp.float32),
             jnp.zeros((rows,), jnp.float32))
    acc, m, l = _three_loops(r["ranges"], body, carry)
    out = acc / l[:, None]
    r["o"][...] = out.reshape(bqt, pack, cfg.head_pad).astype(r["o"].dtype)
    r["lse"][...] = (m + jnp.log2(l)).reshape(bqt, pack)  # base 2, of the scaled logits


# ----------------------------------------------------------------- dq kernel

_DQ_NAMES = ("ranges", "q", "k", "v", "do", "lse", "delta", "window", "cos", "sin", "seg", "dq")


def _dq_kernel(*refs, cfg, nq):
    r = _unpack(refs, cfg, _DQ_NAMES)
    pack = cfg.pack
    bqt, bk = cfg.tuning.dq_q // pack, cfg.tuning.dq_k
    rows = bqt * pack
    i = nq - 1 - pl.program_id(0)
    qt = _Tile(r, i * bqt, bqt, cfg, pack)
    q_parts = _load_parts(lambda c: r["q"][:, :, c], qt.cos, qt.sin, cfg, r["q"].dtype)
    do = _flat(r["do"][...])
    lse = r["lse"][...].reshape(rows)[:, None]
    delta = r["delta"][...].reshape(rows)[:, None]
    window = r["window"][0] if cfg.has_window else None

    def body(j, dq_parts, masked):
        kt = _Tile(r, j * bk, bk, cfg)
        k_parts = _load_parts(lambda c: r["k"][kt.rows, c], kt.cos, kt.sin, cfg, r["k"].dtype)
        s, t = _scores(q_parts, k_parts, cfg)
        if masked:
            s = _masked_scores(s, qt, kt, window, cfg)
        p = jnp.exp2(s * LOG2E - lse)
        ds = _dlogits(p, _dot(do, r["v"][kt.rows, :], trans_b=True), delta, t, cfg)
        ds = ds.astype(r["k"].dtype)
        return tuple(acc + _dot(ds, kp) for acc, kp in zip(dq_parts, k_parts))

    width = cfg.half if cfg.rope else cfg.head_pad
    init = tuple(jnp.zeros((rows, width), jnp.float32) for _ in range(2 if cfg.rope else 1))
    dq_parts = _three_loops(r["ranges"], body, init)

    def write(cols, x):
        r["dq"][:, :, cols] = x.astype(r["dq"].dtype)

    _store_parts(write, dq_parts, qt.cos, qt.sin, cfg, pack=pack)


# ----------------------------------------------------------------- dk/dv kernel

_DKV_NAMES = ("ranges", "q", "k", "v", "do", "lse", "delta", "window", "cos", "sin", "seg",
              "dk", "dv")


def _dkv_kernel(*refs, cfg):
    """One key block of one kv head; loops over the query heads of its group (GQA), `pack`
    heads at a time, and over the visible query blocks."""
    r = _unpack(refs, cfg, _DKV_NAMES)
    pack = cfg.pack
    bk, bqt = cfg.tuning.dkv_k, cfg.tuning.dkv_q // pack
    rows = bqt * pack
    kt = _Tile(r, pl.program_id(0) * bk, bk, cfg)
    k_parts = _load_parts(lambda c: r["k"][:, c], kt.cos, kt.sin, cfg, r["k"].dtype)
    v = r["v"][...]
    window = r["window"][0] if cfg.has_window else None
    # Scores are computed transposed, [keys, query rows], so that the dV and dK updates
    # are plain (untransposed) products.

    def heads_body(hc, carry):
        heads = pl.ds(hc * pack, pack)

        def body(i, carry, masked):
            dk_parts, dv = carry
            qt = _Tile(r, i * bqt, bqt, cfg, pack)
            q_parts = _load_parts(lambda c: r["q"][qt.rows, heads, c], qt.cos, qt.sin, cfg,
                                  r["q"].dtype)
            do = _flat(r["do"][qt.rows, heads, :])
            lse = r["lse"][qt.rows, heads].reshape(1, rows)
            delta = r["delta"][qt.rows, heads].reshape(1, rows)
            s_t, t_t = _scores(k_parts, q_parts, cfg)
            if masked:
                s_t = _masked_scores(s_t, qt, kt, window, cfg, keys_first=True)
            p_t = jnp.exp2(s_t * LOG2E - lse)
            dv = dv + _dot(p_t.astype(do.dtype), do)
            ds_t = _dlogits(p_t, _dot(v, do, trans_b=True), delta, t_t, cfg)
            ds_t = ds_t.astype(r["q"].dtype)
            return tuple(acc + _dot(ds_t, qp) for acc, qp in zip(dk_parts, q_parts)), dv

        return _three_loops(r["ranges"], body, carry)

    dk_init = tuple(jnp.zeros((bk, cfg.half), jnp.float32) for _ in range(2))  # rope: _backward_dkv
    dv_init = jnp.zeros((bk, cfg.head_pad), jnp.float32)
    dk_parts, dv = lax.fori_loop(0, cfg.num_groups // pack, heads_body, (dk_init, dv_init))

    def write(cols, x):
        r["dk"][:, cols] = x.astype(r["dk"].dtype)

    _store_parts(write, dk_parts, kt.cos, kt.sin, cfg)
    r["dv"][...] = dv.astype(r["dv"].dtype)


# ----------------------------------------------------------------- block ranges (jnp)

def _block_ranges(cfg, bq, bk, aux, by_key):
    """int32 [Bs, n, 4] (lo, a, b, hi) per query block (or per key block if by_key).

    bq/bk are block sizes in positions. A block pair is visited if any pair in it may be
    visible (causal, window, key padding, overlapping per-block segment id ranges) and is
    "full" (no mask needed) if all pairs in it are visible. [a, b) is the first run of
    full blocks, so everything in it really is full even if segment ids repeat.
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


def _aux_specs(cfg, aux):
    """BlockSpecs + operands for the optional inputs (grid is always (block, b, head))."""
    specs, ops = [], []
    Tp, half = cfg.seq_pad, cfg.half
    if cfg.has_window:
        specs.append(pl.BlockSpec((1,), lambda i, b, h: (0,)))
        ops.append(aux["window"])
    if cfg.rope:
        per_batch = aux["cos"].shape[0] > 1
        spec = pl.BlockSpec((None, Tp, half), lambda i, b, h: (b if per_batch else 0, 0, 0))
        specs += [spec, spec]
        ops += [aux["cos"], aux["sin"]]
    if cfg.has_segments:
        specs.append(pl.BlockSpec((None, Tp), lambda i, b, h: (b, 0)))
        ops.append(aux["seg"])
    return specs, ops


def _ranges_spec(ranges, block_of):
    per_batch = ranges.shape[0] > 1
    return pl.BlockSpec((None, None, 4),
                        lambda i, b, h: (b if per_batch else 0, block_of(i), 0))


def _query_major_specs(cfg, bq_rows):
    """Specs shared by the forward and dq kernels: grid (query block, b, head pack)."""
    Tp, P, pack = cfg.seq_pad, cfg.head_pad, cfg.pack
    bqt = bq_rows // pack
    nq = Tp // bqt
    packs_per_kv = cfg.num_groups // pack
    rev = lambda i: nq - 1 - i  # noqa: E731  (the kernels visit blocks in this order)
    return dict(
        nq=nq, bqt=bqt, rev=rev,
        q=pl.BlockSpec((None, bqt, pack, P), lambda i, b, h: (b, rev(i), h, 0)),
        kv=pl.BlockSpec((None, Tp, None, P), lambda i, b, h: (b, 0, h // packs_per_kv, 0)),
        row=pl.BlockSpec((None, bqt, pack), lambda i, b, h: (b, rev(i), h)),
    )


def _forward(cfg, q, k, v, aux):
    """Padded q/k/v -> padded out [B, Tp, Hq, P] and base-2 lse [B, Tp, Hq]."""
    B, Tp, Hq, P = q.shape
    tn = cfg.tuning
    sp = _query_major_specs(cfg, tn.fwd_q)
    ranges = _block_ranges(cfg, sp["bqt"], tn.fwd_k, aux, by_key=False)
    aux_specs, aux_ops = _aux_specs(cfg, aux)
    return pl.pallas_call(
        functools.partial(_fwd_kernel, cfg=cfg, nq=sp["nq"]),
        grid=(sp["nq"], B, Hq // cfg.pack),
        in_specs=[_ranges_spec(ranges, sp["rev"]), sp["q"], sp["kv"], sp["kv"], *aux_specs],
        out_specs=[sp["q"], sp["row"]],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                   jax.ShapeDtypeStruct((B, Tp, Hq), jnp.float32)],
        compiler_params=_compiler_params(tn.fwd_warps, tn.fwd_stages, cfg.interpret),
        interpret=cfg.interpret,
        name="flash_attention_fwd",
    )(ranges, q, k, v, *aux_ops)


def _backward_dq(cfg, q, k, v, aux, do, lse, delta):
    """Padded inputs -> padded dq: one program per (query block, batch, head pack), like the forward."""
    B, Tp, Hq, P = q.shape
    tn = cfg.tuning
    aux_specs, aux_ops = _aux_specs(cfg, aux)
    sp = _query_major_specs(cfg, tn.dq_q)
    ranges = _block_ranges(cfg, sp["bqt"], tn.dq_k, aux, by_key=False)
    return pl.pallas_call(
        functools.partial(_dq_kernel, cfg=cfg, nq=sp["nq"]),
        grid=(sp["nq"], B, Hq // cfg.pack),
        in_specs=[_ranges_spec(ranges, sp["rev"]), sp["q"], sp["kv"], sp["kv"], sp["q"],
                  sp["row"], sp["row"], *aux_specs],
        out_specs=sp["q"],
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=_compiler_params(tn.dq_warps, tn.bwd_stages, cfg.interpret),
        interpret=cfg.interpret,
        name="flash_attention_dq",
    )(ranges, q, k, v, do, lse, delta, *aux_ops)


def _backward_dkv(cfg, q, k, v, aux, do, lse, delta):
    """Padded inputs -> padded dk, dv: one program per (key block, batch, kv head); it loops over
    the group's query heads, so K/V are never repeated and dk/dv need no atomics."""
    if not cfg.rope:
        cfg, aux = _unit_rope_tables(cfg, aux, q.dtype)
    B, Tp, Hq, P = q.shape
    Hkv = k.shape[2]
    tn, G = cfg.tuning, cfg.num_groups
    aux_specs, aux_ops = _aux_specs(cfg, aux)
    bk = tn.dkv_k
    nk = Tp // bk
    ranges = _block_ranges(cfg, tn.dkv_q // cfg.pack, bk, aux, by_key=True)
    kv_spec = pl.BlockSpec((None, bk, None, P), lambda j, b, h: (b, j, h, 0))
    qg_spec = pl.BlockSpec((None, Tp, G, P), lambda j, b, h: (b, 0, h, 0))
    rowg_spec = pl.BlockSpec((None, Tp, G), lambda j, b, h: (b, 0, h))
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, cfg=cfg),
        grid=(nk, B, Hkv),
        in_specs=[_ranges_spec(ranges, lambda j: j), qg_spec, kv_spec, kv_spec, qg_spec,
                  rowg_spec, rowg_spec, *aux_specs],
        out_specs=[kv_spec, kv_spec],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=_compiler_params(tn.dkv_warps, tn.bwd_stages, cfg.interpret),
        interpret=cfg.interpret,
        name="flash_attention_dkv",
    )(ranges, q, k, v, do, lse, delta, *aux_ops)
    return dk, dv


def _unit_rope_tables(cfg, aux, dtype):
    """The dk/dv kernel always runs with RoPE tables, unit ones (cos 1, sin 0: exact) for a call
    without RoPE. Its table-less variant gave wrong dK on the H200 with GQA (0.06-0.86 relative
    error in `bench_attention.py`'s checks, session 6; the interpreter does not show it, nor are dq
    and dv affected); the variant with tables is GPU-checked."""
    shape = (1, cfg.seq_pad, cfg.head_pad // 2)
    table = jnp.float32 if jnp.dtype(dtype).itemsize > 2 else jnp.dtype(cfg.tuning.rope_table_dtype)
    aux = {**aux, "cos": jnp.ones(shape, table), "sin": jnp.zeros(shape, table)}
    return dataclasses.replace(cfg, rope=True), aux


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


def _dkv_settings(tuning, fused):
    """The Mosaic dk/dv kernel's launch settings from the tuning (separate or fused)."""
    rows_early = (not fused) if tuning.mosaic_dkv_rows_early is None else tuning.mosaic_dkv_rows_early
    fused_only = {"no_auto_barriers": tuning.mosaic_fused_no_auto_barriers} if fused else {}
    return {"static_consumers": tuning.mosaic_dkv_static_consumers, "rows_early": rows_early, **fused_only,
            **dict(tuning.mosaic_dkv_kwargs)}


def _flash_fwd(cfg, q, k, v, aux):
    if cfg.rope_outside:  # the residuals are the rotated q, k (as with the rotation outside)
        cos, sin = rope_cos_sin(aux["rope_pos"], aux["inv_freq"])
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    padded = _pad(q, cfg), _pad(k, cfg), _pad(v, cfg)
    if cfg.mosaic_fwd:  # D = 128 or 256, so only T is padded (to a multiple of 128)
        tn = cfg.tuning
        key_block = attention_mosaic.BLOCK_K if cfg.rope or cfg.wide else tn.mosaic_fwd_key_block  # tables: 64 only
        pingpong = tn.mosaic_fwd_pingpong and key_block == 128
        persistent = tn.mosaic_persistent_fwd and not cfg.rope  # the tile order settings apply to it only
        settings = dict(
            longest_first=tn.mosaic_longest_first, ctas="sms" if persistent else None,
            key_block=key_block, pingpong=pingpong, fold_scale=tn.mosaic_fwd_fold_scale,
            early_qk=tn.mosaic_fwd_early_qk and key_block == 128 and not pingpong,
            head_chunk=_head_chunk(tn.mosaic_fwd_head_chunk, q.shape[2], cfg.num_groups) if persistent else None,
            schedule=tn.mosaic_fwd_schedule if persistent else "snake")
        out, lse = attention_mosaic.mosaic_forward(  # lse [B, Hq, Tp]
            *padded, aux.get("cos"), aux.get("sin"), aux.get("seg"), ranges=aux.get("mosaic_q_ranges"),
            scale=cfg.scale, window=aux.get("window"), softcap=cfg.softcap,
            **{**settings, **dict(tn.mosaic_fwd_kwargs)})
    else:
        out, lse = _forward(cfg, *padded, aux)  # lse [B, Tp, Hq]
    out = _unpad(out, cfg)
    return out, (q, k, v, aux, out, lse)


def _head_chunk(wanted, heads, group):
    """The largest chunk of whole GQA groups dividing `heads` and at most `wanted` (None: None)."""
    if wanted is None:
        return None
    return max(c for c in range(group, heads + 1, group) if heads % c == 0 and c <= max(wanted, group))


def _flash_bwd(cfg, res, dout):
    q, k, v, aux, out, lse = res
    dout = dout.astype(q.dtype)
    # delta = rowsum(dO * O): the softmax-gradient row term, a cheap fused XLA reduction.
    delta = _pad_rows(jnp.sum(dout.astype(jnp.float32) * out.astype(jnp.float32), axis=-1), cfg)  # [B, Tp, Hq]
    # Padded rows have dO = 0 and delta = 0, so they add nothing to dk/dv. The Triton kernels take
    # lse/delta as [B, Tp, Hq], the Mosaic ones as [B, Hq, Tp]; XLA drops the layout no kernel reads.
    qp, kp, vp, dop = _pad(q, cfg), _pad(k, cfg), _pad(v, cfg), _pad(dout, cfg)
    triton = (qp, kp, vp, aux, dop, jnp.swapaxes(lse, 1, 2) if cfg.mosaic_fwd else lse, delta)
    tables = _kernel_rope_tables(cfg, aux["rope_pos"], aux["inv_freq"], q.dtype) if cfg.rope_outside else \
        (aux.get("cos"), aux.get("sin"))
    mosaic = (qp, kp, vp, dop, lse, jnp.swapaxes(delta, 1, 2), *tables, aux.get("seg"))
    un_rotate = dict(pre_rotated=True) if cfg.rope_outside else {}
    shared = dict(scale=cfg.scale, longest_first=cfg.tuning.mosaic_longest_first, window=aux.get("window"),
                  softcap=cfg.softcap)
    if cfg.mosaic_dq and cfg.mosaic_dkv and not cfg.rope and cfg.tuning.mosaic_fused_bwd and not cfg.wide:
        dk, dv, dq = attention_mosaic_dkv.mosaic_dkv(*mosaic, ranges=aux.get("mosaic_k_ranges"), with_dq=True,
                                                     **shared, **_dkv_settings(cfg.tuning, fused=True))
        return _unpad(dq, cfg), _unpad(dk, cfg), _unpad(dv, cfg), jax.tree_util.tree_map(_zero_cotangent, aux)
    if cfg.mosaic_dq:
        settings = dict(static_consumers=cfg.tuning.mosaic_dq_static_consumers, **un_rotate, **shared)
        dq = attention_mosaic_dq.mosaic_dq(*mosaic, ranges=aux.get("mosaic_q_ranges"),
                                           **{**settings, **dict(cfg.tuning.mosaic_dq_kwargs)})
    else:
        dq = _backward_dq(cfg, *triton)
    if cfg.mosaic_dkv and cfg.wide:
        dk, dv = attention_mosaic_dkv_wide.mosaic_dkv_wide(*mosaic[:6], aux.get("seg"),  # (no tables at D = 256)
                                                           ranges=aux.get("mosaic_k_ranges"), **shared)
    elif cfg.mosaic_dkv:
        dk, dv = attention_mosaic_dkv.mosaic_dkv(*mosaic, ranges=aux.get("mosaic_k_ranges"), **shared,
                                                 **_dkv_settings(cfg.tuning, fused=False), **un_rotate)
    else:
        dk, dv = _backward_dkv(cfg, *triton)
    return _unpad(dq, cfg), _unpad(dk, cfg), _unpad(dv, cfg), jax.tree_util.tree_map(_zero_cotangent, aux)


def _zero_cotangent(x):
    if jnp.issubdtype(x.dtype, jnp.integer):
        return np.zeros(x.shape, jax.dtypes.float0)
    return jnp.zeros_like(x)


_flash.defvjp(_flash_fwd, _flash_bwd)


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


FUSED_BWD_MIN_T = 16384  # Tuning.mosaic_fused_bwd=None: the fused Mosaic backward from here on


def _resolve_tuning(T, P, G, itemsize, tuning, block_q, block_k):
    tn = tuning or default_tuning(P, itemsize)
    if tn.mosaic_fused_bwd is None:
        tn = dataclasses.replace(tn, mosaic_fused_bwd=T >= FUSED_BWD_MIN_T)
    if block_q is not None or block_k is not None:
        bq, bk = block_q or block_k, block_k or block_q
        tn = dataclasses.replace(tn, fwd_q=bq, fwd_k=bk, dq_q=bq, dq_k=bk, dkv_q=bq, dkv_k=bk)
    pack = tn.pack
    if pack is None:  # largest power of two dividing the group, at most 8
        pack = 1
        while pack < 8 and G % (2 * pack) == 0 and 2 * pack <= min(tn.fwd_q, tn.dq_q, tn.dkv_q):
            pack *= 2
    if G % pack:
        raise ValueError(f"flash_attention: pack={pack} must divide Hq/Hkv={G}")
    # Short sequences: shrink blocks so padding stays below 2x (never under 16 rows,
    # Triton's smallest dot). Query blocks count rows = positions * pack.
    cap = max(16, _next_pow2(T))
    sizes = {f: min(getattr(tn, f), cap * (pack if f in ("fwd_q", "dq_q", "dkv_q") else 1))
             for f in _BLOCK_FIELDS}
    tn = dataclasses.replace(tn, pack=pack, **sizes)
    for f in _BLOCK_FIELDS:
        rows = getattr(tn, f)
        if rows & (rows - 1) or rows < pack:
            raise ValueError(f"flash_attention: block {f}={rows} must be a power of two >= {pack}")
    positions_per_block = [tn.fwd_q // pack, tn.fwd_k, tn.dq_q // pack, tn.dq_k,
                           tn.dkv_q // pack, tn.dkv_k]
    step = max(positions_per_block)
    return tn, -(-T // step) * step


def _kernel_rope_tables(cfg, positions, inv_freq, dtype):
    """The kernels' cos/sin [B|1, Tp, P/2] (rows padded to Tp, frequencies to P/2) in the table
    dtype (float32 for 32-bit inputs)."""
    freq = jnp.pad(inv_freq.astype(jnp.float32), (0, cfg.head_pad // 2 - cfg.head_dim // 2))
    angles = _pad_rows(positions, cfg).astype(jnp.float32)[..., None] * freq  # rope_cos_sin's arithmetic
    table = jnp.float32 if jnp.dtype(dtype).itemsize > 2 else jnp.dtype(cfg.tuning.rope_table_dtype)
    return jnp.cos(angles).astype(table), jnp.sin(angles).astype(table)


def _rope_in_kernel(tn: Tuning, all_mosaic: bool) -> bool:
    return tn.rope_in_kernel if tn.rope_in_kernel is not None else not all_mosaic


def _use_mosaic(cfg, dtype) -> bool:
    """The Mosaic GPU kernels where they compute the same thing and the device is sm_90 (the forward
    measured 1.5x the Triton one on the H100, attention_NOTES.md session 4; the backward 1.3x, session
    5). T is padded to the Triton blocks' multiple, which for D = 128 is 128 (causal masking hides
    the padded keys)."""
    from unsloth_jax.compat import is_sm90

    tn = cfg.tuning
    wide_tables = cfg.wide and cfg.rope and tn.rope_in_kernel
    opted_in = ((not cfg.wide or tn.mosaic_wide_heads) and (not cfg.has_window or tn.mosaic_windows)
                and (cfg.softcap is None or tn.mosaic_softcap))
    return (tn.mosaic_fwd is not False and not cfg.interpret and cfg.head_pad == cfg.head_dim and opted_in
            and (not cfg.rope or tn.rope_table_dtype == "float16") and not wide_tables
            and (not cfg.has_segments or tn.mosaic_packed)
            and attention_mosaic.supported(head_dim=cfg.head_dim, seq_len=cfg.seq_pad, dtype=dtype,
                                           causal=cfg.causal, has_window=cfg.has_window,
                                           has_segments=cfg.has_segments, softcap=cfg.softcap)
            and is_sm90())


def flash_attention(q, k, v, *, positions=None, segment_ids=None, inv_freq=None, causal=True,
                    sliding_window=None, logit_softcap=None, scale=None, interpret=False,
                    block_q=None, block_k=None, tuning=None):
    """Flash attention with RoPE (inside the kernels or just before them: Tuning.rope_in_kernel);
    same semantics as the reference.

    Differentiable w.r.t. q, k, v (not inv_freq). `block_q`/`block_k` override the block
    sizes of all three kernels (powers of two >= 16; query blocks count positions x packed
    heads); `tuning` (a Tuning) sets them individually. sliding_window may be a traced
    int scalar (>= 1), e.g. per layer inside a scan; a Python int of at least T hides no key and is
    dropped (Mistral's 4096 at T <= 4096), so such calls take the Mosaic kernels where they apply.
    """
    B, T, Hq, D = q.shape
    if isinstance(sliding_window, (int, np.integer)) and sliding_window >= T:
        sliding_window = None  # i - j < T <= window for every pair
    Hkv = k.shape[2]
    if k.shape != (B, T, Hkv, D) or v.shape != k.shape or Hq % Hkv or D % 2:
        raise ValueError(f"flash_attention: bad shapes q={q.shape} k={k.shape} v={v.shape}")
    P = max(32, _next_pow2(D))
    G = Hq // Hkv
    tn, Tp = _resolve_tuning(T, P, G, jnp.dtype(q.dtype).itemsize, tuning, block_q, block_k)
    cfg = _Cfg(seq_len=T, seq_pad=Tp, head_dim=D, head_pad=P, num_groups=G, pack=tn.pack,
               causal=bool(causal), has_window=sliding_window is not None,
               has_segments=segment_ids is not None, rope=inv_freq is not None,
               softcap=None if logit_softcap is None else float(logit_softcap),
               scale=float(D ** -0.5 if scale is None else scale), tuning=tn,
               interpret=bool(interpret))
    mosaic_fwd = _use_mosaic(cfg, q.dtype)
    cfg = dataclasses.replace(cfg, mosaic_fwd=mosaic_fwd, mosaic_dq=mosaic_fwd and tn.mosaic_dq is not False,
                              mosaic_dkv=mosaic_fwd and tn.mosaic_dkv is not False)
    pos = jnp.arange(T)[None] if positions is None else positions
    aux = {}
    all_mosaic = cfg.mosaic_dq and cfg.mosaic_dkv
    wide_mosaic = mosaic_fwd and cfg.wide  # no RoPE tables fit there
    if cfg.rope and (wide_mosaic or not _rope_in_kernel(tn, all_mosaic)):
        outside = tn.rope_grad_in_kernel and all_mosaic and not tn.mosaic_fused_bwd
        if outside:  # rotated in the forward rule, un-rotated by the backward kernels
            aux["rope_pos"], aux["inv_freq"] = pos, inv_freq.astype(jnp.float32)
        else:
            cos, sin = rope_cos_sin(pos, inv_freq)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        cfg = dataclasses.replace(cfg, rope=False, rope_outside=outside)
    if cfg.has_window:
        aux["window"] = jnp.asarray(sliding_window, jnp.int32).reshape(1)
    if cfg.rope:
        aux["cos"], aux["sin"] = _kernel_rope_tables(cfg, pos, inv_freq, q.dtype)
    if cfg.has_segments:
        aux["seg"] = _pad_rows(segment_ids.astype(jnp.int32), cfg, _PAD_SEGMENT)
        if cfg.mosaic_fwd:  # once per call (a residual, so the backward does not sort again)
            key_block = attention_mosaic_dkv_wide.TILE if wide_mosaic else attention_mosaic.BLOCK_Q
            aux["mosaic_q_ranges"], aux["mosaic_k_ranges"] = attention_mosaic.segment_ranges(aux["seg"], key_block)
    return _flash(cfg, q, k, v, aux)


def attention(q, k, v, **kw):
    """The model's entry point: picks the implementation by UNSLOTH_JAX_KERNELS / backend."""
    from unsloth_jax.compat import kernel_mode

    mode = kernel_mode()
    if mode == "reference":
        return flash_attention_reference(q, k, v, **kw)
    return flash_attention(q, k, v, interpret=(mode == "interpret"), **kw)
