"""NF4 + double quantization against bitsandbytes' own CPU implementation (bit for bit)."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unsloth_jax import quant as Q

torch = pytest.importorskip("torch")
bnb = pytest.importorskip("bitsandbytes")
F = bnb.functional

# like="cpu" reproduces the CPU path of bitsandbytes >= 0.50 (its 8-bit absmax quantizer became a
# 65536-bin lookup table then); older versions round some absmax codes differently.
_BNB_VERSION = tuple(int(p) for p in bnb.__version__.split(".")[:2] if p.isdigit())
needs_bnb_050 = pytest.mark.skipif(_BNB_VERSION < (0, 50), reason="CPU absmax rounding of bitsandbytes >= 0.50")


def bnb_quantize(w, double_quant=True):
    t = torch.from_numpy(np.ascontiguousarray(w)) if isinstance(w, np.ndarray) else w
    return F.quantize_4bit(t, blocksize=64, quant_type="nf4", compress_statistics=double_quant)


def midpoint_block():
    """64 values of absmax 1 that sit exactly on, and one ulp either side of, every NF4 midpoint."""
    b = Q.NF4_BOUNDS
    vals = np.concatenate([b, np.nextafter(b, 2, dtype=np.float32), np.nextafter(b, -2, dtype=np.float32),
                           [1.0, -1.0, 0.0, -0.0]]).astype(np.float32)
    return np.concatenate([vals, np.zeros(64 - len(vals), np.float32)])


def weights(rng):
    yield "random", rng.standard_normal((64, 128)).astype(np.float32)
    w = rng.standard_normal((32, 256)).astype(np.float32) * 0.02
    w[3, :64] = 0.0                                     # an all-zero block
    w[5, 64:128] = midpoint_block()                     # ties at absmax 1
    w[6, 128:192] = 4.0 * midpoint_block()              # ties after exact power-of-two scaling
    yield "zeros+midpoints", w
    yield "odd numel", rng.standard_normal((3, 21)).astype(np.float32)     # 63 values: one partial block
    yield "in % 64 != 0", rng.standard_normal((40, 96)).astype(np.float32)  # blocks straddle rows
    yield "many blocks", rng.standard_normal((300, 448)).astype(np.float32) * 0.05  # >256 absmax blocks


def test_dynamic_map_matches_bitsandbytes():
    assert np.array_equal(Q.DYNAMIC_MAP, F.create_dynamic_map(signed=True).numpy())
    assert np.array_equal(Q.NF4_CODE, F.get_4bit_type("nf4", device="cpu").numpy())


@pytest.mark.parametrize("case", range(5))
def test_nf4_codes_and_absmax_bit_exact(case):
    name, w = list(weights(np.random.default_rng(case)))[case]
    packed, state = bnb_quantize(w, double_quant=False)
    q = Q.quantize_nf4(w, double_quant=False, like="cpu")
    assert np.array_equal(np.asarray(q.packed), packed.numpy().reshape(-1)), name
    assert np.array_equal(np.asarray(q.absmax), state.absmax.numpy()), name


@needs_bnb_050
@pytest.mark.parametrize("case", range(5))
def test_double_quant_bit_exact(case):
    name, w = list(weights(np.random.default_rng(case)))[case]
    packed, state = bnb_quantize(w)
    q = Q.quantize_nf4(w, like="cpu")
    assert np.array_equal(np.asarray(q.packed), packed.numpy().reshape(-1)), name
    # bitsandbytes' offset is an fp32 sum in torch's reduction order; ours is the compensated mean.
    ours, theirs = np.float32(q.offset), np.float32(state.offset.item())
    assert abs(ours - theirs) <= np.spacing(theirs), (name, ours, theirs)
    # Given the same offset, the 8-bit absmax codes and the per-256 scales are identical.
    _, absmax = Q._nf4_codes(jnp.asarray(w), 64, "cpu")
    codes, scale, _ = Q._double_quantize(absmax, "cpu", offset=theirs)
    assert np.array_equal(np.asarray(codes), state.absmax.numpy()), name
    assert np.array_equal(np.asarray(scale), state.state2.absmax.numpy()), name
    assert np.array_equal(np.asarray(q.nested_code), state.state2.code.numpy())


def exact_mean_weight(rng, shape=(64, 256)):
    """Block absmaxes are multiples of 1/256 and the block count a power of two, so every fp32
    summation order gives the same mean: the whole pipeline can be compared, offset included."""
    w = rng.integers(-255, 256, size=shape).astype(np.float32) / np.float32(256)
    return w


@needs_bnb_050
def test_end_to_end_bit_exact_and_dequantize():
    w = exact_mean_weight(np.random.default_rng(7))
    packed, state = bnb_quantize(w)
    q = Q.quantize_nf4(w, like="cpu")
    assert np.float32(q.offset) == np.float32(state.offset.item())
    assert np.array_equal(np.asarray(q.packed), packed.numpy().reshape(-1))
    assert np.array_equal(np.asarray(q.absmax), state.absmax.numpy())
    assert np.array_equal(np.asarray(q.nested_scale), state.state2.absmax.numpy())
    ref = F.dequantize_4bit(packed, state).numpy()
    assert np.array_equal(np.asarray(Q.dequantize_nf4(q)), ref)
    ref16 = F.dequantize_4bit(packed, state).to(torch.bfloat16).float().numpy()
    assert np.array_equal(np.asarray(Q.dequantize_nf4(q, jnp.bfloat16).astype(jnp.float32)), ref16)


@pytest.mark.parametrize("case", range(5))
def test_dequantize_matches_bitsandbytes(case):
    """Dequantize bitsandbytes' own tensors (loaded, not re-quantized) and compare."""
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute  # torch.compile'd; use the plain fn

    name, w = list(weights(np.random.default_rng(case)))[case]
    packed, state = bnb_quantize(w)
    q = Q.from_bnb_tensors("m", {f"m.weight.{k}" if k != "weight" else "m.weight": v.numpy()
                                 for k, v in {"weight": packed, **state.as_dict(packed=True)}.items()})
    absmax = (F.dequantize_blockwise(state.absmax, state.state2) + state.offset).float()
    assert np.array_equal(np.asarray(Q.absmax_f32(q)), absmax.numpy()), name
    # bitsandbytes' reference op; its AVX512 CPU kernel mis-indexes absmax when a row is not a
    # whole number of blocks, so the public dequantize_4bit is compared only where rows are whole.
    ref = getattr(_dequantize_4bit_compute, "__wrapped__", _dequantize_4bit_compute)(packed.reshape(-1), absmax, F.get_4bit_type("nf4", device="cpu"),
                                   64, w.shape, torch.float32).numpy()
    assert np.array_equal(np.asarray(Q.dequantize_nf4(q)), ref), name
    if w.shape[1] % 64 == 0:
        assert np.array_equal(np.asarray(Q.dequantize_nf4(q)), F.dequantize_4bit(packed, state).numpy())


def test_bfloat16_input_and_recorded_dtype():
    w = torch.randn(48, 128, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    packed, state = bnb_quantize(w, double_quant=False)
    q = Q.quantize_nf4(jnp.asarray(w.float().numpy()).astype(jnp.bfloat16), double_quant=False, like="cpu")
    assert q.dtype == "bfloat16"
    assert np.array_equal(np.asarray(q.packed), packed.numpy().reshape(-1))
    assert np.array_equal(np.asarray(q.absmax), state.absmax.numpy())
    assert Q.quantize_nf4(w.float().numpy(), record_dtype="bfloat16").dtype == "bfloat16"


@needs_bnb_050
def test_bnb_checkpoint_round_trip():
    """to_bnb_tensors writes what bitsandbytes' Linear4bit saves; from_bnb_tensors reads it back."""
    w = exact_mean_weight(np.random.default_rng(3), (32, 128))
    lin = bnb.nn.Linear4bit(128, 32, bias=False, compress_statistics=True, quant_type="nf4")
    lin.weight = bnb.nn.Params4bit(torch.from_numpy(w).to(torch.bfloat16), requires_grad=False,
                                   quant_type="nf4", compress_statistics=True, blocksize=64)
    lin = lin.to("cpu")
    theirs = {k: v.numpy() for k, v in lin.state_dict().items()}
    q = Q.quantize_nf4(jnp.asarray(w).astype(jnp.bfloat16), like="cpu")
    ours = Q.to_bnb_tensors("", q)
    ours = {k[1:]: v for k, v in ours.items()}  # prefix "" -> keys start with "."
    assert sorted(ours) == sorted(theirs)
    for k in theirs:
        assert ours[k].dtype == theirs[k].dtype and ours[k].shape == theirs[k].shape, k
        assert np.array_equal(ours[k], theirs[k]), k
    qs = json.loads(bytes(ours["weight.quant_state.bitsandbytes__nf4"]))
    assert qs["shape"] == [32, 128] and qs["dtype"] == "bfloat16"

    back = Q.from_bnb_tensors("layer", {f"layer.{k}": v for k, v in theirs.items()})
    assert back.shape == (32, 128) and back.blocksize == 64 and back.dtype == "bfloat16"
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(q)):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    with torch.no_grad():
        ref = lin(torch.eye(128, dtype=torch.bfloat16)).float().numpy().T  # = dequantized weight
    assert np.array_equal(np.asarray(Q.dequantize_nf4(back, jnp.bfloat16).astype(jnp.float32)), ref)


def test_from_bnb_tensors_errors():
    from unsloth_jax.errors import CheckpointError, UnsupportedModelError

    q = Q.quantize_nf4(np.ones((4, 64), np.float32))
    t = Q.to_bnb_tensors("p", q)
    with pytest.raises(CheckpointError, match="p.weight.absmax"):
        Q.from_bnb_tensors("p", {k: v for k, v in t.items() if not k.endswith(".absmax")})
    bad = dict(t)
    bad["p.weight.quant_state.bitsandbytes__nf4"] = np.frombuffer(
        json.dumps({"quant_type": "fp4", "blocksize": 64, "dtype": "float32", "shape": [4, 64]}).encode(), np.uint8)
    with pytest.raises(UnsupportedModelError):
        Q.from_bnb_tensors("p", bad)


def _cuda_dquantize_scalar(code, x):
    """A line-by-line transcription of bitsandbytes' CUDA `dQuantize<0>` for one value."""
    pivot, upper_p, lower_p = 127, 255, 0
    lower, upper = np.float32(-1.0), np.float32(1.0)
    val = code[pivot]
    i = 64
    while i > 0:
        if x > val:
            lower_p, lower, pivot = pivot, val, pivot + i
        else:
            upper_p, upper, pivot = pivot, val, pivot - i
        val = code[pivot]
        i >>= 1
    if upper_p == 255:
        upper = code[upper_p]
    if lower_p == 0:
        lower = code[lower_p]
    if x > val:
        return upper_p if x > np.float32((upper + val) * np.float32(0.5)) else pivot
    return lower_p if x < np.float32((lower + val) * np.float32(0.5)) else pivot


def test_cuda_rounding_rules():
    """like='cuda' follows bitsandbytes' CUDA kernels: absmax codes by the binary search above,
    value * (1/absmax) everywhere, and an all-zero block coded 0 (NaN falls through)."""
    code = Q.DYNAMIC_MAP
    mids = ((code[:-1] + code[1:]) / np.float32(2)).astype(np.float32)
    rng = np.random.default_rng(0)
    x = np.concatenate([code, mids, np.nextafter(mids, 2, dtype=np.float32), np.nextafter(mids, -2, dtype=np.float32),
                        rng.uniform(-1, 1, 500).astype(np.float32), [np.nan]]).astype(np.float32)
    want = np.array([_cuda_dquantize_scalar(code, v) for v in x], np.uint8)
    assert np.array_equal(np.asarray(Q._dquantize_cuda(jnp.asarray(x), code)), want)

    w = rng.standard_normal((2, 80)).astype(np.float32)  # 160 values: two full blocks, one partial
    w[0, :64] = 0.0
    q = Q.quantize_nf4(w, double_quant=False, like="cuda")
    flat = w.reshape(-1)
    codes = []
    for b in range(3):
        blk = flat[64 * b: 64 * b + 64]
        inv = np.float32(1.0) / np.max(np.abs(blk)) if np.any(blk) else np.float32(np.inf)
        with np.errstate(invalid="ignore"):
            s = (blk * inv).astype(np.float32)
        codes += [int(np.sum(v > Q.NF4_BOUNDS)) for v in s]
    want = (np.array(codes[0::2]) << 4) | np.array(codes[1::2])
    assert np.array_equal(np.asarray(q.packed), want.astype(np.uint8))
    assert np.asarray(q.packed)[0] == 0  # the zero block: code 0 (bitsandbytes CPU would give 7)


def test_pytree_stack_scan_and_nbytes():
    rng = np.random.default_rng(1)
    ws = [rng.standard_normal((16, 64)).astype(np.float32) for _ in range(3)]
    qs = [Q.quantize_nf4(w) for w in ws]
    stacked = Q.stack_nf4(qs)
    assert stacked.packed.shape == (3, 512) and stacked.shape == (16, 64)
    assert Q.nf4_nbytes(stacked) == 3 * Q.nf4_nbytes(qs[0])
    assert Q.nf4_nbytes(qs[0]) == 512 + 16 + 4 + 256 * 4 + 4

    def body(carry, q):
        return carry, Q.dequantize_nf4(q)

    _, out = jax.jit(lambda s: jax.lax.scan(body, 0, s))(stacked)
    for i in range(3):
        assert np.array_equal(np.asarray(out[i]), np.asarray(Q.dequantize_nf4(qs[i])))
        err = np.abs(np.asarray(out[i]) - ws[i]).max() / np.abs(ws[i]).max()
        assert err < 0.2
    with pytest.raises(ValueError, match="one layer"):
        Q.dequantize_nf4(stacked)
