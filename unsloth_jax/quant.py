"""NF4 + double quantization, bit-exact with bitsandbytes, in the bitsandbytes storage layout.

A weight `w` in HF layout `[out, in]` is flattened row-major and cut into blocks of `blocksize`
(64) values. Each block keeps its absolute maximum; each value is scaled into [-1, 1] by it and
rounded to the nearest of the 16 NF4 code values (ties go to the lower code). Two 4-bit codes share
a byte, the first element in the HIGH nibble. With double quantization the fp32 absmax vector is
stored as 8-bit codes too: subtract its mean (`offset`), cut into blocks of 256, scale each block by
its own absmax (`nested_scale`, fp32) and round to bitsandbytes' signed 8-bit dynamic map
(`nested_code`). Dequantization is `NF4[code] * (nested_code[q] * nested_scale + offset)`.

bitsandbytes rounds differently on its two backends, and `like=` picks which one to reproduce:
- "cuda" (default): its GPU kernels, which made the published `*-bnb-4bit` checkpoints and run
  `load_in_4bit=True` on a GPU. Absmax codes come from a 7-step binary search with midpoint ties;
  an all-zero block gets code 0 (0 * inf = NaN falls through every comparison).
- "cpu": its CPU path in bitsandbytes >= 0.50 (what the tests can call): the last, partial block
  is divided by its absmax (full blocks are multiplied by the reciprocal), an all-zero block gets
  the code of 0.0, and absmax codes come from a 65536-bin lookup table over [-1, 1] (nearly, not
  exactly, nearest).
Checked bit for bit: "cpu" against bitsandbytes 0.50.2 in tests/test_quant.py, "cuda" against its
CUDA kernels on an H100 (benchmarks/nf4_NOTES.md).
The only value neither backend pins down is `offset`: each sums in fp32 in its own order. We use
a compensated mean, which is the correctly rounded fp32 mean in all but near-tie cases.

`NF4Tensor` is a pytree: array leaves (stackable along a leading layer axis; a stacked tensor's
leaves carry that axis, `lax.scan` slices it off) plus static metadata (per-layer shape,
blocksize, original dtype). Functions here take the per-layer (unstacked) tensor.
"""
from __future__ import annotations

import functools
import json
import math
from typing import Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

from unsloth_jax.errors import CheckpointError, UnsupportedModelError

# The 16 NF4 values (quantiles of N(0, 1), QLoRA); bitsandbytes' `get_4bit_type("nf4")`.
NF4_CODE = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
], dtype=np.float32)
# fp32 midpoints; identical to the thresholds hard-coded in bitsandbytes' CUDA `dQuantizeNF4`.
NF4_BOUNDS = ((NF4_CODE[:-1] + NF4_CODE[1:]) / np.float32(2)).astype(np.float32)

NESTED_BLOCKSIZE = 256
_DTYPE_NAMES = ("float32", "bfloat16", "float16")


def _linspace_f32(start: float, end: float, steps: int) -> np.ndarray:
    """torch.linspace in float32 as its vectorized CPU kernel computes it: a float32 step, the
    first half `start + step * i` and the second `end - step * (steps - 1 - i)`, each one fused
    multiply-add. Both products and sums here are exact in float64, so one rounding remains."""
    start, end = np.float32(start), np.float32(end)
    step = np.float64(np.float32((end - start) / np.float32(steps - 1)))
    i = np.arange(steps)
    up = np.float64(start) + step * i
    down = np.float64(end) - step * (steps - 1 - i)
    return np.where(i < steps // 2, up, down).astype(np.float32)


def dynamic_map_signed() -> np.ndarray:
    """bitsandbytes' `create_dynamic_map(signed=True)`: 256 sorted fp32 values in [-1, 1].

    For each exponent e = -6..0 there are 2**(e+6) linear steps in (0.1, 1) * 10**e, mirrored for
    negative values; plus 0 and 1. Computed in float32, in torch's order, so values match exactly.
    """
    data = []
    for i in range(7):
        bounds = _linspace_f32(0.1, 1.0, 2 ** i + 1)
        means = ((bounds[:-1] + bounds[1:]) / np.float32(2)).astype(np.float32)
        scale = np.float32(10.0 ** (i - 6))
        data += list((scale * means).astype(np.float32))
        data += list((-scale * means).astype(np.float32))
    data += [np.float32(0.0), np.float32(1.0)]
    return np.sort(np.array(data, dtype=np.float32))


DYNAMIC_MAP = dynamic_map_signed()


def _cpu_absmax_lut(code: np.ndarray) -> np.ndarray:
    """bitsandbytes' CPU 8-bit quantizer: [-1, 1] in 65536 bins, each mapped to the code index
    whose midpoint interval holds the bin's left-edge value."""
    mids = (np.float32(0.5) * (code[:-1] + code[1:])).astype(np.float32)
    i = np.arange(65536).astype(np.float32)
    vals = (np.float32(-1.0) + (np.float32(2.0) * i) / np.float32(65535)).astype(np.float32)
    return np.searchsorted(mids, vals, side="left").astype(np.uint8)


_DYNAMIC_LUT = _cpu_absmax_lut(DYNAMIC_MAP)


# ---- the pytree ------------------------------------------------------------------------------

@jax.tree_util.register_pytree_node_class
class NF4Tensor:
    """A `[out, in]` weight in bitsandbytes NF4 storage.

    Leaves (per layer; a stacked tensor adds a leading axis to each):
      packed       uint8 [ceil(numel / 2)]      two codes a byte, first element in the high nibble
      absmax       uint8 [nblocks]              8-bit absmax codes (double quant), or
                   fp32  [nblocks]              the absmax itself (double_quant=False)
      nested_scale fp32  [ceil(nblocks / 256)]  per-256-block scale of the absmax codes, or None
      nested_code  fp32  [256]                  the 8-bit map those codes index, or None
      offset       fp32  []                     mean subtracted from absmax before coding, or None
    Static metadata: `shape` (per-layer HF shape), `blocksize`, `dtype` (name of the original dtype,
    recorded in the bitsandbytes quant_state).
    """

    def __init__(self, packed, absmax, nested_scale=None, nested_code=None, offset=None, *,
                 shape, blocksize=64, dtype="float32"):
        self.packed = packed
        self.absmax = absmax
        self.nested_scale = nested_scale
        self.nested_code = nested_code
        self.offset = offset
        self.shape = tuple(int(s) for s in shape)
        self.blocksize = int(blocksize)
        self.dtype = str(dtype)

    def tree_flatten(self):
        leaves = (self.packed, self.absmax, self.nested_scale, self.nested_code, self.offset)
        return leaves, (self.shape, self.blocksize, self.dtype)

    @classmethod
    def tree_unflatten(cls, aux, leaves):
        shape, blocksize, dtype = aux
        return cls(*leaves, shape=shape, blocksize=blocksize, dtype=dtype)

    @property
    def double_quant(self) -> bool:
        return self.nested_scale is not None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nblocks(self) -> int:
        return -(-self.numel // self.blocksize)

    def __repr__(self):
        lead = tuple(np.shape(self.packed)[:-1])
        stacked = f", stacked={lead}" if lead else ""
        return (f"NF4Tensor(shape={self.shape}, blocksize={self.blocksize}, "
                f"double_quant={self.double_quant}, dtype={self.dtype}{stacked})")


def is_nf4(x) -> bool:
    """Whether a weight is NF4-quantized (stacked over layers or not)."""
    return isinstance(x, NF4Tensor)


def nf4_layer(q: NF4Tensor, layer: int) -> NF4Tensor:
    """One layer's tensor of a stacked NF4Tensor (the inverse of stack_nf4 for one index)."""
    return jax.tree.map(lambda leaf: leaf[layer], q)


def stack_nf4(tensors) -> NF4Tensor:
    """Stack per-layer NF4Tensors of one shape along a new leading axis (for the layer scan)."""
    tensors = list(tensors)
    aux = {jax.tree_util.tree_flatten(t)[1] for t in tensors}
    if len(aux) != 1:
        raise ValueError(f"stack_nf4: tensors differ in shape/blocksize/dtype/double_quant: {sorted(map(str, aux))}")
    return jax.tree.map(lambda *xs: jnp.stack(xs), *tensors)


def nf4_nbytes(q: NF4Tensor) -> int:
    """Bytes the tensor occupies (all leaves, stacked or not)."""
    return int(sum(np.prod(np.shape(x)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(q)))


# ---- quantization ----------------------------------------------------------------------------

def _as_blocks(flat, blocksize):
    """Zero-pad a 1-D array to whole blocks: [nblocks, blocksize]. Zeros never raise an absmax."""
    n = flat.shape[0]
    nblocks = -(-n // blocksize)
    return jnp.pad(flat, (0, nblocks * blocksize - n)).reshape(nblocks, blocksize)


def _bucketize(x, bounds):
    """Number of bounds strictly below x: nearest code, ties to the lower one. NaN -> 0."""
    idx = jnp.zeros(x.shape, jnp.uint8)
    for b in bounds:
        idx = idx + (x > jnp.float32(b)).astype(jnp.uint8)
    return idx


def _nf4_codes(w, blocksize, like):
    """-> (codes uint8 [nblocks * blocksize], absmax fp32 [nblocks]) for the flattened weight."""
    flat = w.reshape(-1).astype(jnp.float32)
    n = flat.shape[0]
    blocks = _as_blocks(flat, blocksize)
    absmax = jnp.max(jnp.abs(blocks), axis=1)
    if like == "cuda":
        # value * (1 / absmax); an all-zero block gives NaN, which lands on code 0.
        scaled = blocks * (jnp.float32(1.0) / absmax)[:, None]
    else:
        # bitsandbytes' CPU op clamps absmax at 1e-38 (so zeros scale to 0 -> the code of 0.0)
        # and divides the last, partial block instead of multiplying by the reciprocal. XLA may
        # flush that denormal to zero, so zero blocks are handled with `where`, not the clamp.
        zero = absmax == 0
        safe = jnp.where(zero, jnp.float32(1.0), absmax)
        scaled = blocks * (jnp.float32(1.0) / safe)[:, None]
        if n % blocksize:
            last = blocks[-1] / safe[-1]
            scaled = scaled.at[-1].set(last)
            # The partial block's stored absmax keeps the clamp (a zero tail stores 1e-38).
            absmax = absmax.at[-1].set(jnp.where(zero[-1], jnp.float32(1e-38), absmax[-1]))
        scaled = jnp.where(zero[:, None], jnp.float32(0.0), jnp.clip(scaled, -1.0, 1.0))
    return _bucketize(scaled, NF4_BOUNDS).reshape(-1), absmax


def _pack(codes, n):
    """Two codes a byte, the first in the high nibble; an odd count is padded with the next code
    (bitsandbytes pads with the code of 0.0, which is what the zero-padded block holds)."""
    codes = codes[: n + (n % 2)]
    return (codes[0::2] << 4) | codes[1::2]


def _compensated_mean(a):
    """fp32 mean with a second pass over the residuals: correctly rounded except near ties."""
    n = a.shape[0]
    m0 = jnp.sum(a) / jnp.float32(n)
    return m0 + jnp.sum(a - m0) / jnp.float32(n)


def _dquantize_cuda(x, code):
    """bitsandbytes' CUDA `dQuantize<0>`: binary search over the 256-entry map, then a midpoint test."""
    code = jnp.asarray(code)
    pivot = jnp.full(x.shape, 127, jnp.int32)
    upper_p = jnp.full(x.shape, 255, jnp.int32)
    lower_p = jnp.zeros(x.shape, jnp.int32)
    upper = jnp.full(x.shape, 1.0, jnp.float32)
    lower = jnp.full(x.shape, -1.0, jnp.float32)
    val = code[pivot]
    for step in (64, 32, 16, 8, 4, 2, 1):
        up = x > val
        lower_p, lower = jnp.where(up, pivot, lower_p), jnp.where(up, val, lower)
        upper_p, upper = jnp.where(up, upper_p, pivot), jnp.where(up, upper, val)
        pivot = jnp.where(up, pivot + step, pivot - step)
        val = code[pivot]
    upper = jnp.where(upper_p == 255, code[255], upper)
    lower = jnp.where(lower_p == 0, code[0], lower)
    above = x > val
    to_upper = x > (upper + val) * jnp.float32(0.5)
    to_lower = x < (lower + val) * jnp.float32(0.5)
    idx = jnp.where(above, jnp.where(to_upper, upper_p, pivot), jnp.where(to_lower, lower_p, pivot))
    return idx.astype(jnp.uint8)


def _dquantize_cpu(x, absmax2):
    """bitsandbytes' CPU 8-bit quantizer: index a 65536-bin table; an all-zero block gets code 0."""
    x = jnp.clip(x, -1.0, 1.0)
    bins = ((x + jnp.float32(1.0)) * jnp.float32(0.5) * jnp.float32(65535) + jnp.float32(0.5))
    codes = jnp.asarray(_DYNAMIC_LUT)[bins.astype(jnp.int32)]
    return jnp.where((absmax2 == 0)[:, None], jnp.uint8(0), codes)


def _double_quantize(absmax, like, offset=None):
    """fp32 absmax [nblocks] -> (codes uint8 [nblocks], nested_scale fp32 [nb2], offset fp32 [])."""
    if offset is None:
        offset = _compensated_mean(absmax)
    offset = jnp.asarray(offset, jnp.float32)
    centered = absmax - offset
    blocks = _as_blocks(centered, NESTED_BLOCKSIZE)
    scale = jnp.max(jnp.abs(blocks), axis=1)
    x = blocks * (jnp.float32(1.0) / scale)[:, None]  # NaN for an all-zero block -> code 0 in both
    codes = _dquantize_cuda(x, DYNAMIC_MAP) if like == "cuda" else _dquantize_cpu(x, scale)
    return codes.reshape(-1)[: absmax.shape[0]], scale, offset


@functools.partial(jax.jit, static_argnames=("blocksize", "double_quant", "like"))
def _quantize(w, blocksize, double_quant, like):
    codes, absmax = _nf4_codes(w, blocksize, like)
    packed = _pack(codes, math.prod(w.shape))
    if not double_quant:
        return packed, absmax, None, None, None
    qabs, scale, offset = _double_quantize(absmax, like)
    return packed, qabs, scale, jnp.asarray(DYNAMIC_MAP), offset


def quantize_nf4(w, blocksize: int = 64, double_quant: bool = True, *, like: str = "cuda",
                 record_dtype: Optional[str] = None) -> NF4Tensor:
    """Quantize an HF-layout `[out, in]` (any shape) float weight to NF4, as bitsandbytes'
    `quantize_4bit(w, blocksize, quant_type="nf4", compress_statistics=double_quant)` does on its
    `like` backend ("cuda" or "cpu"; see the module doc). Runs on the default JAX device.

    `record_dtype` is the dtype name written into the bitsandbytes quant_state (the dtype its
    dequantize returns); default: w's dtype. Pass the checkpoint's dtype when w was upcast first."""
    if like not in ("cuda", "cpu"):
        raise ValueError(f"like={like!r}: use 'cuda' or 'cpu' (which bitsandbytes backend to match).")
    if blocksize not in (32, 64, 128, 256, 512, 1024, 2048, 4096):
        raise ValueError(f"blocksize={blocksize}: bitsandbytes supports 32, 64, ..., 4096.")
    dtype = record_dtype or (jnp.dtype(w.dtype).name if hasattr(w, "dtype") else "float32")
    if dtype not in _DTYPE_NAMES:
        raise ValueError(f"record_dtype={dtype!r}: use one of {_DTYPE_NAMES}.")
    w = jnp.asarray(w)
    if not jnp.issubdtype(w.dtype, jnp.floating) or w.size == 0:
        raise ValueError(f"quantize_nf4 needs a non-empty float array, got {w.dtype} {w.shape}.")
    leaves = _quantize(w, blocksize, double_quant, like)
    return NF4Tensor(*leaves, shape=w.shape, blocksize=blocksize, dtype=dtype)


# ---- dequantization --------------------------------------------------------------------------

def _check_unstacked(q: NF4Tensor, who: str):
    if np.ndim(q.packed) != 1:
        raise ValueError(f"{who} takes one layer's NF4Tensor; got leaves with leading axes "
                         f"{tuple(np.shape(q.packed)[:-1])} (index or scan over them first).")


def absmax_f32(q: NF4Tensor):
    """The per-block fp32 absmax [nblocks], undoing double quantization as bitsandbytes does:
    (nested_code[q] * nested_scale) + offset, two fp32 roundings (no fused multiply-add)."""
    if not q.double_quant:
        return q.absmax.astype(jnp.float32)
    nb = q.absmax.shape[0]
    scale = jnp.repeat(q.nested_scale, NESTED_BLOCKSIZE)[:nb]
    scaled = q.nested_code[q.absmax.astype(jnp.int32)] * scale
    return no_fma(scaled) + q.offset


def no_fma(x):
    """x, unchanged (NaN stays NaN), but no longer a bare multiply: XLA's LLVM backend would
    otherwise contract `x * y + z` into one fused multiply-add and round once instead of twice."""
    return jnp.where(x == x, x, jnp.float32(jnp.nan))


def unpack_codes(packed, n):
    """uint8 [ceil(n/2)] -> uint8 codes [n], high nibble first."""
    codes = jnp.stack([packed >> 4, packed & 15], axis=-1).reshape(-1)
    return codes[:n]


def dequantize_nf4(q: NF4Tensor, dtype=jnp.float32):
    """The `[out, in]` weight: NF4[code] * absmax in fp32, then cast to `dtype` (as bitsandbytes)."""
    _check_unstacked(q, "dequantize_nf4")
    return _dequantize(q, jnp.dtype(dtype))


@functools.partial(jax.jit, static_argnames=("dtype",))
def _dequantize(q: NF4Tensor, dtype):
    n, bs = q.numel, q.blocksize
    vals = jnp.asarray(NF4_CODE)[unpack_codes(q.packed, n).astype(jnp.int32)]
    blocks = _as_blocks(vals, bs) * absmax_f32(q)[:, None]
    return blocks.reshape(-1)[:n].reshape(q.shape).astype(dtype)


# ---- the bitsandbytes / HF checkpoint format ------------------------------------------------

_QS_KEY = "quant_state.bitsandbytes__nf4"


def _quant_state_json(q: NF4Tensor) -> bytes:
    """The JSON bitsandbytes packs into `<prefix>.weight.quant_state.bitsandbytes__nf4`
    (`QuantState.as_dict(packed=True)`: same keys, same order, `json.dumps` defaults)."""
    state = {"quant_type": "nf4", "blocksize": q.blocksize, "dtype": q.dtype, "shape": list(q.shape)}
    if q.double_quant:
        state.update({"nested_blocksize": NESTED_BLOCKSIZE, "nested_dtype": "float32",
                      "nested_offset": float(np.float32(np.asarray(q.offset)))})
    return json.dumps(state).encode("utf-8")


def to_bnb_tensors(prefix: str, q: NF4Tensor) -> dict:
    """The tensors a bitsandbytes `Linear4bit` named `prefix` saves (HF `*-bnb-4bit` checkpoints):
    `<prefix>.weight` (uint8 [ceil(numel/2), 1]) and `<prefix>.weight.{absmax, quant_map,
    nested_absmax, nested_quant_map, quant_state.bitsandbytes__nf4}`, as numpy arrays."""
    _check_unstacked(q, "to_bnb_tensors")
    w = f"{prefix}.weight"
    out = {
        w: np.asarray(q.packed, np.uint8).reshape(-1, 1),
        f"{w}.absmax": np.asarray(q.absmax),
        f"{w}.quant_map": NF4_CODE.copy(),
    }
    if q.double_quant:
        out[f"{w}.nested_absmax"] = np.asarray(q.nested_scale, np.float32)
        out[f"{w}.nested_quant_map"] = np.asarray(q.nested_code, np.float32)
    out[f"{w}.{_QS_KEY}"] = np.frombuffer(_quant_state_json(q), np.uint8).copy()
    return out


def is_bnb_4bit(prefix: str, tensors: Mapping) -> bool:
    """Whether `tensors` hold a bitsandbytes 4-bit weight for module `prefix`."""
    return f"{prefix}.weight.{_QS_KEY}" in tensors or f"{prefix}.weight.quant_state.bitsandbytes__fp4" in tensors


def from_bnb_tensors(prefix: str, tensors: Mapping) -> NF4Tensor:
    """Read the NF4 weight of module `prefix` from a bitsandbytes 4-bit state dict (any mapping of
    names to numpy-convertible arrays, e.g. a safetensors file), without re-quantizing."""
    w = f"{prefix}.weight"

    def get(key):
        if key not in tensors:
            raise CheckpointError(f"{key}: missing from the bitsandbytes 4-bit checkpoint; it needs "
                                  f"{w} with .absmax, .quant_map and .{_QS_KEY} (re-save it with bitsandbytes).")
        return np.asarray(tensors[key])

    if f"{w}.quant_state.bitsandbytes__fp4" in tensors:
        raise UnsupportedModelError(f"{w}: FP4 (bnb_4bit_quant_type='fp4') is not supported; "
                                    "re-quantize with bnb_4bit_quant_type='nf4'.")
    state = json.loads(bytes(get(f"{w}.{_QS_KEY}").astype(np.uint8).reshape(-1)).decode("utf-8"))
    if state.get("quant_type") != "nf4":
        raise UnsupportedModelError(f"{w}: quant_type={state.get('quant_type')!r}; only 'nf4' is supported.")
    quant_map = get(f"{w}.quant_map").astype(np.float32).reshape(-1)
    if not np.array_equal(quant_map, NF4_CODE):
        raise CheckpointError(f"{w}.quant_map: not the standard NF4 code book; cannot load this weight.")
    shape = tuple(int(s) for s in state["shape"])
    numel, blocksize = math.prod(shape), int(state["blocksize"])
    nblocks = -(-numel // blocksize)
    # bitsandbytes may store the packed bytes in another dtype (quant_storage); the bytes are the same.
    packed = np.ascontiguousarray(get(w)).view(np.uint8).reshape(-1)
    if packed.shape[0] != (numel + 1) // 2:
        raise CheckpointError(f"{w}: {packed.shape[0]} packed bytes, expected {(numel + 1) // 2} for shape {shape}.")
    absmax = get(f"{w}.absmax").reshape(-1)
    if absmax.shape[0] != nblocks:
        raise CheckpointError(f"{w}.absmax: {absmax.shape[0]} values, expected {nblocks} blocks of {blocksize}.")
    dtype = state.get("dtype", "float32")
    if "nested_absmax" in state or f"{w}.nested_absmax" in tensors:
        if int(state.get("nested_blocksize", NESTED_BLOCKSIZE)) != NESTED_BLOCKSIZE:
            raise UnsupportedModelError(f"{w}: nested_blocksize={state['nested_blocksize']}; only 256 is supported.")
        nested_scale = get(f"{w}.nested_absmax").astype(np.float32).reshape(-1)
        nested_code = get(f"{w}.nested_quant_map").astype(np.float32).reshape(-1)
        offset = np.float32(state["nested_offset"])
        return NF4Tensor(jnp.asarray(packed), jnp.asarray(absmax.astype(np.uint8)), jnp.asarray(nested_scale),
                         jnp.asarray(nested_code), jnp.asarray(offset), shape=shape, blocksize=blocksize,
                         dtype=dtype)
    return NF4Tensor(jnp.asarray(packed), jnp.asarray(absmax.astype(np.float32)), shape=shape,
                     blocksize=blocksize, dtype=dtype)
