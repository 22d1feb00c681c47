"""The fused NF4 matmul kernel (Pallas interpreter, CPU) against the jnp reference: forward and dx."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import nf4_gemv as G
from pallas_kernels import nf4_matmul as K
from unsloth_jax.quant import quantize_nf4, stack_nf4

T = K.TileConfig
CASES = [
    # (M, N, K, dtype, double_quant, tiles): ragged M/N, K % 64 != 0, split-K, both decoders (prmt
    # runs as the select tree under the interpreter),
    # the weight as left or right MMA operand
    (20, 40, 128, jnp.float32, True, T(16, 16, 64, 4, 2, 1, 2, "select", False)),
    (20, 40, 128, jnp.bfloat16, True, T(16, 16, 64, 4, 2, 1, 2, "prmt")),
    (5, 33, 96, jnp.float32, True, T(16, 16, 64, 4, 2, 1, 2, "select", False)),  # blocks straddle rows
    (17, 48, 256, jnp.bfloat16, True, T(16, 16, 128, 4, 2, 2, 2, "select")),   # split-K, 2 blocks a tile
    (3, 48, 192, jnp.float32, False, T(16, 16, 64, 4, 2, 1, 2, "prmt")),     # fp32 absmax
    # nibbles kept apart (even/odd K columns): both operand sides, split-K, ragged M and N
    (20, 40, 256, jnp.float32, True, T(16, 16, 128, 4, 2, 1, 2, "select", True, False)),
    (5, 33, 256, jnp.bfloat16, True, T(16, 16, 128, 4, 2, 2, 2, "select", False, False)),
    (3, 24, 128, jnp.float32, False, T(16, 16, 64, 4, 2, 1, 2, "prmt", False, False)),
    # bf16-rounded codes (the few-rows default for 16-bit inputs), both nibble layouts
    (16, 40, 256, jnp.bfloat16, True, T(16, 16, 128, 4, 2, 1, 2, "prmt16", False, True)),
    (9, 24, 128, jnp.bfloat16, True, T(16, 16, 64, 4, 2, 2, 2, "prmt16", False, False)),
    # split partials summed in the kernel by each tile's last program: both nibble layouts,
    # ragged M and N (clamped duplicate columns), the weight on either side, 4-way split
    (17, 40, 256, jnp.float32, True, T(16, 16, 64, 4, 2, 4, 2, "select", False, False, True)),
    (5, 33, 256, jnp.bfloat16, False, T(16, 16, 64, 4, 2, 2, 2, "prmt16", True, True, True)),
]


def rel_err(a, b):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return np.abs(a - b).max() / max(np.abs(b).max(), 1e-30)


@pytest.mark.parametrize("case", range(len(CASES)))
def test_kernel_matches_reference_fwd_and_dx(case):
    m, n, k, dtype, dq, cfg = CASES[case]
    rng = np.random.default_rng(case)
    q = quantize_nf4(rng.standard_normal((n, k)).astype(np.float32) * 0.05, double_quant=dq)
    x = jnp.asarray(rng.standard_normal((m, k)), dtype)
    dy = jnp.asarray(rng.standard_normal((m, n)), dtype)

    def kern(a):
        return K.nf4_matmul(a, q, interpret=True, fwd_config=cfg, dx_config=cfg)

    y, vjp = jax.vjp(kern, x)
    y_ref, vjp_ref = jax.vjp(lambda a: K.nf4_matmul_reference(a, q), x)
    assert y.dtype == dtype and y.shape == (m, n)
    # Same bf16-rounded weights, fp32 accumulation in both: only summation order differs.
    tol = 1e-5 if dtype == jnp.float32 else 1e-2
    assert rel_err(y, y_ref) < tol
    (dx,), (dx_ref,) = vjp(dy), vjp_ref(dy)
    assert dx.dtype == dtype and dx.shape == x.shape
    assert rel_err(dx, dx_ref) < tol


def _scan_layers(x, stacked, matmul):
    """Residual layers over a stacked NF4Tensor, scanned as the model scans its layers."""
    def body(h, q):
        return matmul(h, q) * 0.1 + h, None
    return jax.lax.scan(body, x, stacked)[0]


def test_batched_input_scan_and_zero_weight_cotangent():
    rng = np.random.default_rng(9)
    stacked = stack_nf4([quantize_nf4(rng.standard_normal((64, 64)).astype(np.float32)) for _ in range(2)])
    x = jnp.asarray(rng.standard_normal((2, 3, 64)), jnp.float32)  # leading batch dims
    cfg = T(16, 16, 64, 4, 2, 1, 1, "select")

    def kern(h, q):
        return K.nf4_matmul(h, q, interpret=True, fwd_config=cfg, dx_config=cfg)

    out = _scan_layers(x, stacked, kern)
    assert out.shape == x.shape
    assert rel_err(out, _scan_layers(x, stacked, K.nf4_matmul_reference)) < 1e-5

    gx, gq = jax.grad(lambda a, s: _scan_layers(a, s, kern).sum(), argnums=(0, 1), allow_int=True)(x, stacked)
    gx_ref = jax.grad(lambda a: _scan_layers(a, stacked, K.nf4_matmul_reference).sum())(x)
    assert rel_err(gx, gx_ref) < 1e-5
    for leaf in jax.tree.leaves(gq):  # the frozen base weight: float0 for codes, zeros for floats
        assert leaf.dtype == jax.dtypes.float0 or not np.any(np.asarray(leaf))


def test_dispatch_modes(monkeypatch):
    rng = np.random.default_rng(3)
    q = quantize_nf4(rng.standard_normal((24, 64)).astype(np.float32))
    x = jnp.asarray(rng.standard_normal((4, 64)), jnp.float32)
    monkeypatch.setenv("UNSLOTH_JAX_KERNELS", "reference")
    y_ref = K.nf4_linear(x, q)
    assert np.array_equal(np.asarray(y_ref), np.asarray(K.nf4_matmul_reference(x, q)))
    monkeypatch.setenv("UNSLOTH_JAX_KERNELS", "interpret")
    assert rel_err(K.nf4_linear(x, q), y_ref) < 1e-5
    with pytest.raises(ValueError, match="features"):
        K.nf4_linear(jnp.zeros((4, 32)), q)


@pytest.mark.parametrize("m,n,k", [(1, 4096, 4096), (16, 1024, 4096), (2048, 14336, 4096),
                                   (8192, 4096, 14336), (7, 40, 96)])
def test_default_config_is_valid(m, n, k):
    for out, red, dx in ((n, k, False), (k, n, True)):
        cfg = K.default_config(m, out, red, dx=dx)
        for b in (cfg.block_m, cfg.block_n, cfg.block_k):
            assert b >= 16 and b & (b - 1) == 0
        assert cfg.split_k >= 0 and cfg.decode in ("select", "prmt", "prmt16")
        if m <= 16:
            assert cfg.block_m == 16


# ---- the PTX decode, run by a small emulator of the five instructions it uses ----------------------

def _prmt(a, b, sel):
    """PTX prmt.b32 (default mode): byte i of the result is byte (sel nibble i & 7) of b:a,
    or that byte's sign replicated when the nibble's bit 3 is set."""
    pool = (b.astype(np.uint64) << np.uint64(32)) | a.astype(np.uint64)
    out = np.zeros_like(a)
    for i in range(4):
        nib = (sel >> np.uint32(4 * i)) & np.uint32(15)
        byte = ((pool >> (np.uint64(8) * (nib & np.uint32(7)).astype(np.uint64))) & np.uint64(0xFF)).astype(np.uint32)
        byte = np.where(nib & np.uint32(8), np.where(byte & np.uint32(0x80), np.uint32(0xFF), np.uint32(0)), byte)
        out |= byte << np.uint32(8 * i)
    return out


def _run_ptx(asm, operands):
    """Execute the decode's straight-line PTX on uint32 vectors; operands maps '$4' etc. to arrays."""
    regs = dict(operands)

    def val(tok):
        return regs[tok] if tok in regs else np.full_like(next(iter(operands.values())), int(tok, 0))

    for line in asm.split("\n"):
        line = line.strip().rstrip(";")
        if not line or line in "{}" or line.startswith(".reg"):
            continue
        op, args = line.split(None, 1)
        dst, *src = [a.strip() for a in args.split(",")]
        a = [val(t) for t in src]
        regs[dst] = {"mov.b32": lambda: a[0], "and.b32": lambda: a[0] & a[1],
                     "or.b32": lambda: a[0] | a[1], "shr.b32": lambda: a[0] >> a[1],
                     "shl.b32": lambda: a[0] << a[1],
                     "prmt.b32": lambda: _prmt(*a)}[op]()
    return regs


@pytest.mark.parametrize("bf16_codes", [False, True])
def test_prmt_decode_gives_exact_nf4_values(bf16_codes):
    import ml_dtypes
    from unsloth_jax.quant import NF4_CODE
    # independent of the kernel module's table: NF4 rounded to bf16 by ml_dtypes here
    table = NF4_CODE.astype(ml_dtypes.bfloat16).astype(np.float32) if bf16_codes else NF4_CODE
    assert bf16_codes == (not np.array_equal(table, NF4_CODE))
    rng = np.random.default_rng(0)
    words = np.concatenate([rng.integers(0, 2**32, 20000, dtype=np.uint64).astype(np.uint32),
                            np.arange(256, dtype=np.uint32) * np.uint32(0x01010101)])  # each byte value in every slot
    asm = K.PRMT_PAIR_DECODE_BF16_ASM if bf16_codes else K.PRMT_PAIR_DECODE_ASM
    regs = _run_ptx(asm, {"$8": words})  # hi nibbles -> $0-$3, lo -> $4-$7
    for nibble, shift in (("hi", 4), ("lo", 0)):
        for i in range(4):  # byte i of the word is element i of the pack
            codes = (words >> np.uint32(8 * i + shift)) & np.uint32(15)
            out = f"${i if nibble == 'hi' else 4 + i}"
            np.testing.assert_array_equal(regs[out].view(np.float32), table[codes])


def test_pallas_dequantize_and_dequant_matmul_match_reference():
    from unsloth_jax.quant import dequantize_nf4
    rng = np.random.default_rng(5)
    for n, k, dq in ((40, 256, True), (33, 128, False), (8, 96, True)):  # ragged N, K % 64 != 0
        q = quantize_nf4(rng.standard_normal((n, k)).astype(np.float32) * 0.02, double_quant=dq)
        for dtype in (jnp.float32, jnp.bfloat16):
            w = K.nf4_dequantize(q, dtype, interpret=True,
                                 tiles=T(16, 16, 128, 4, 1, 1, 1))
            want = np.asarray(dequantize_nf4(q, dtype), np.float32)
            np.testing.assert_array_equal(np.asarray(w, np.float32), want)
            w_t = K.nf4_dequantize(q, dtype, transpose=True, interpret=True, tiles=T(16, 16, 64, 4, 1, 1, 1))
            np.testing.assert_array_equal(np.asarray(w_t, np.float32), want.T)
        x = jnp.asarray(rng.standard_normal((3, 5, k)), jnp.float32)
        y, vjp = jax.vjp(lambda a: K.dequant_matmul(a, q, True), x)
        y_ref, vjp_ref = jax.vjp(lambda a: K.nf4_matmul_reference(a, q), x)
        assert rel_err(y, y_ref) < 1e-5
        dy = jnp.asarray(rng.standard_normal(y.shape), jnp.float32)
        assert rel_err(vjp(dy)[0], vjp_ref(dy)[0]) < 1e-5


# ---- the CUDA-core few-rows kernels (pallas_kernels/nf4_gemv.py) -----------------------------------

GEMV_CASES = [
    # (M, N, K, dtype, double_quant, config): ragged N (clamped rows), odd block counts, split
    # reductions (fp32 partials), several rows, both decoders' interpreter twins
    (1, 40, 256, jnp.float32, True, G.GemvConfig(16, 2, 4, 2, 0, "prmt")),
    (1, 33, 192, jnp.bfloat16, False, G.GemvConfig(16, 4, 4, 2, 2, "prmt16")),
    (3, 70, 512, jnp.float32, True, G.GemvConfig(32, 4, 4, 2, 3, "prmt")),
    (2, 48, 1024, jnp.bfloat16, True, G.GemvConfig(16, 2, 4, 2, 4, "prmt16")),
    (4, 24, 704, jnp.float32, False, None),  # 11 blocks a row; the default config (exact for fp32)
    (1, 24, 128, jnp.bfloat16, True, None),
    (1, 40, 256, jnp.float32, True, G.GemvConfig(16, 2, 4, 2, 2, "prmt", True)),  # partials summed in the kernel
    (2, 48, 1024, jnp.bfloat16, False, G.GemvConfig(16, 2, 4, 2, 4, "prmt16", True)),
]


@pytest.mark.parametrize("case", range(len(GEMV_CASES)))
def test_gemv_kernels_match_reference_fwd_and_dx(case):
    m, n, k, dtype, dq, cfg = GEMV_CASES[case]
    rng = np.random.default_rng(40 + case)
    q = quantize_nf4(rng.standard_normal((n, k)).astype(np.float32) * 0.05, double_quant=dq)
    x = jnp.asarray(rng.standard_normal((m, k)), dtype)
    dy = jnp.asarray(rng.standard_normal((m, n)), dtype)
    cfg = cfg or G.default_gemv_config(n, k, dtype=dtype)
    y, vjp = jax.vjp(lambda a: K.nf4_matmul(a, q, interpret=True, fwd_config=cfg, dx_config=cfg), x)
    y_ref, vjp_ref = jax.vjp(lambda a: K.nf4_matmul_reference(a, q), x)
    (dx,), (dx_ref,) = vjp(dy), vjp_ref(dy)
    assert y.dtype == dtype and y.shape == (m, n) and dx.dtype == dtype and dx.shape == (m, k)
    # The weight is not rounded to x's dtype here (exact fp32, or bf16-rounded NF4 values times an
    # fp32 absmax): fp32 exact decoding agrees to summation order, the bf16 one to bf16 rounding.
    tol = 1e-5 if dtype == jnp.float32 and cfg.decode == "prmt" else 1e-2
    assert rel_err(y, y_ref) < tol
    assert rel_err(dx, dx_ref) < tol


def test_default_dispatch_takes_the_gemv_kernels_for_one_row(monkeypatch):
    """nf4_matmul's default goes to nf4_gemv for up to GEMV_MAX_ROWS rows (and in % 64 == 0), to
    the MMA kernels otherwise: seen in the lowered kernel names."""
    q = quantize_nf4(np.random.default_rng(2).standard_normal((64, 128)).astype(np.float32))
    q_odd = quantize_nf4(np.random.default_rng(2).standard_normal((64, 96)).astype(np.float32))
    for m, qq, want in ((G.GEMV_MAX_ROWS, q, "nf4_gemv_fwd"), (G.GEMV_MAX_ROWS + 1, q, "nf4_fwd"),
                        (1, q_odd, "nf4_fwd")):
        x = jax.ShapeDtypeStruct((m, qq.shape[1]), jnp.bfloat16)
        text = jax.jit(lambda a: K.nf4_matmul(a, qq)).trace(x).lower(lowering_platforms=("cuda",)).as_text()
        assert want in text


@pytest.mark.parametrize("m", [1, 16, 300])
def test_gpu_kernels_lower_for_cuda_on_cpu(m):
    """The compiled path (prmt decode through our multi-result asm primitive, both nibble layouts,
    split-K, the dequantize pass) must lower to Triton for CUDA; no GPU is needed to check that."""
    q = quantize_nf4(np.random.default_rng(1).standard_normal((256, 512)).astype(np.float32))
    x = jax.ShapeDtypeStruct((m, 512), jnp.bfloat16)
    for cfg in (None, T(16, 64, 128, 4, 4, 2, 8, "prmt", True, True), T(16, 64, 128, 4, 4, 2, 8, "prmt16", False, False, True)):
        def f(a, cfg=cfg):
            y, vjp = jax.vjp(lambda b: K.nf4_matmul(b, q, fwd_config=cfg, dx_config=cfg), a)
            return y, vjp(jnp.ones_like(y))
        text = jax.jit(f).trace(x).lower(lowering_platforms=("cuda",)).as_text()
        prefix = "nf4_gemv" if cfg is None and m <= G.GEMV_MAX_ROWS else "nf4"
        assert f"{prefix}_fwd" in text and f"{prefix}_dx" in text
    text = jax.jit(lambda: K.nf4_dequantize(q, jnp.bfloat16)).trace().lower(lowering_platforms=("cuda",)).as_text()
    assert "nf4_dequantize" in text
    for cfg in (G.GemvConfig(32, 4, 4, 3, 2, "prmt16"), G.GemvConfig(16, 8, 4, 3, 1, "prmt"),
                G.GemvConfig(32, 4, 4, 3, 2, "prmt16", True)):
        def g(a, cfg=cfg):
            y, vjp = jax.vjp(lambda b: K.nf4_matmul(b, q, fwd_config=cfg, dx_config=cfg), a)
            return y, vjp(jnp.ones_like(y))
        text = jax.jit(g).trace(jax.ShapeDtypeStruct((min(m, 4), 512), jnp.bfloat16)).lower(
            lowering_platforms=("cuda",)).as_text()
        assert "nf4_gemv_fwd" in text and "nf4_gemv_dx" in text
