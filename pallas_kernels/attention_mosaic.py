"""Causal GQA flash-attention forward with RoPE inside, as a Mosaic GPU kernel (Hopper: wgmma, TMA,
warp specialization). `flash_attention` uses it for the forward where it applies (`supported`) on
an sm_90 GPU, with the dq and dk/dv kernels of attention_mosaic_dq.py / _dkv.py (or the Triton ones
of `attention.py`, which take its lse as is).

Why: the Triton lowering of Pallas reaches ~0.7x cuDNN's forward without RoPE and ~0.5x with it
(benchmarks/attention_NOTES.md). This kernel runs three warpgroups per CTA (128 query rows of one
head): a producer brings K halves, cos/sin and V in by TMA over `stages` slots and rotates each K
tile once in shared memory (so the 4-8 query heads of a GQA group do not each rotate it), two
consumers (64 rows each) rotate their Q tile once, run QK^T and PV on wgmma with P kept in
registers (with `early_qk` each step issues the next step's QK^T behind its PV: `run_key_steps`),
and hand each slot back on a "consumed" barrier. Causal: key tiles past the diagonal
are never loaded; the consumer of the lower rows runs fewer steps and only keeps the barriers'
phases in step for the rest. Persistent (`ctas`, the default without tables): one CTA per SM
loops over query tiles (`QTiles`), the producer streaming K/V across them. Packing (segment ids):
each CTA starts at the first key tile that can share a segment with its rows
(`segment_block_ranges`), and every tile is masked by segment.

Developed against JAX's Mosaic GPU interpreter on the CPU (tests/test_attention_mosaic.py), which
has no `layout_cast`, transposed wgmma operand or register A operand: under it P goes through
shared memory and QK^T is a jnp dot. The compiled path was checked on the H100 against the Triton
kernels and the reference (benchmarks/run_mosaic_attention.py, attention_NOTES.md session 4).
"""
import copy
import dataclasses
import functools
import heapq
import math
import operator

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

LOG2E = math.log2(math.e)
HEAD_DIM = 128
WIDE_HEAD_DIM = 256  # Gemma's: no RoPE tables, 64-key steps, 2 stages (shared memory); dk/dv: attention_mosaic_dkv_wide
BLOCK_Q = 128  # query rows per CTA (two consumer warpgroups of 64)
BLOCK_K = 64


def supported(*, head_dim, seq_len, dtype, causal, has_window, has_segments, softcap) -> bool:
    """Whether the Mosaic kernels (this forward, attention_mosaic_dq, and for dk/dv attention_mosaic_dkv
    at HEAD_DIM, attention_mosaic_dkv_wide at WIDE_HEAD_DIM) compute the same thing as the Triton ones
    for the call. (has_segments, has_window and softcap are fine: packing, sliding windows and logit
    softcaps are covered.) At WIDE_HEAD_DIM the caller rotates q / k first (no RoPE tables fit in
    shared memory there)."""
    del has_segments, has_window, softcap
    return (head_dim in (HEAD_DIM, WIDE_HEAD_DIM) and seq_len % BLOCK_Q == 0 and causal
            and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16))


def soft_cap(s, scale, softcap):
    """Scaled scores s * scale under a logit softcap c: (c tanh(s scale / c), the tanh, which the
    gradient's factor 1 - tanh^2 needs)."""
    t = jnp.tanh(s * (scale / softcap))
    return softcap * t, t


def soft_cap_grad(ds, tanh):
    """dS times the softcap's derivative 1 - tanh^2 (tanh None: no softcap, dS as it is)."""
    return ds if tanh is None else ds * (1.0 - tanh * tanh)


def window_array(window):
    """A sliding window W (an int or an int scalar array) as the int32 [1] input the kernels read."""
    return jnp.asarray(window, jnp.int32).reshape(1)


def refuse_wide_tables(name, head_dim, tables):
    if head_dim == WIDE_HEAD_DIM and tables is not None:
        raise ValueError(f"{name}: D={WIDE_HEAD_DIM} takes no RoPE tables (they would not fit in shared memory); "
                         "rotate q/k before the call (flash_attention does: Tuning.rope_in_kernel)")


def _first_and_last_occurrence(seg):
    """For each position of seg [B, T]: the first and the last position holding the same id."""
    order = jnp.argsort(seg, axis=-1, stable=True)  # by id, then by position
    ids = jnp.take_along_axis(seg, order, axis=-1)
    idx = jnp.broadcast_to(jnp.arange(seg.shape[1]), seg.shape)
    starts = jnp.concatenate([jnp.ones_like(ids[:, :1], bool), ids[:, 1:] != ids[:, :-1]], axis=-1)
    ends = jnp.concatenate([starts[:, 1:], jnp.ones_like(starts[:, :1])], axis=-1)
    group_start = lax.cummax(jnp.where(starts, idx, 0), axis=1)
    group_end = lax.cummin(jnp.where(ends, idx, seg.shape[1]), axis=1, reverse=True)
    first = jnp.take_along_axis(order, group_start, axis=-1)
    last = jnp.take_along_axis(order, group_end, axis=-1)
    inverse = jnp.argsort(order, axis=-1)  # back from sorted to positional order
    return jnp.take_along_axis(first, inverse, axis=-1), jnp.take_along_axis(last, inverse, axis=-1)


def segment_block_ranges(seg, rows, cols, *, by_key=False, occurrences=None):
    """int32 [B, T // rows, 2]: for each block of `rows` queries (by_key: keys), the range [lo, hi)
    of `cols`-sized key (query) blocks that can hold a pair left visible by causal masking with
    segment ids [B, T]. A query sees no key before the first occurrence of its id, a key no query
    after the last one: exact for contiguous segments (what packing makes, padding included),
    conservative for any other ids (the kernels mask every tile by segment). occurrences: seg's
    `_first_and_last_occurrence`, if already computed."""
    B, T = seg.shape
    first, last = occurrences if occurrences is not None else _first_and_last_occurrence(seg)
    r0 = jnp.arange(T // rows) * rows
    if by_key:  # queries from the diagonal to the last one sharing a key's id
        lo = jnp.broadcast_to(r0 // cols, (B, T // rows))
        hi = last.reshape(B, T // rows, rows).max(-1) // cols + 1
    else:  # keys from the first one sharing a query's id to the diagonal
        lo = first.reshape(B, T // rows, rows).min(-1) // cols
        hi = jnp.broadcast_to((r0 + rows - 1) // cols + 1, (B, T // rows))
    return jnp.stack([lo, hi], axis=-1).astype(jnp.int32)


def segment_ranges(seg, key_block=BLOCK_Q):
    """The block ranges all three Mosaic kernels take, from one pass over seg: (per 128-query CTA
    of the forward and dq kernels, in 64-key tiles; per `key_block`-key CTA of dk/dv, in 64-query
    tiles: 128 for attention_mosaic_dkv, 64 for attention_mosaic_dkv_wide)."""
    occ = _first_and_last_occurrence(seg)
    return (segment_block_ranges(seg, BLOCK_Q, BLOCK_K, occurrences=occ),
            segment_block_ranges(seg, key_block, BLOCK_K, by_key=True, occurrences=occ))


def smem_tiles():
    return (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))


def cta_grid(heads, blocks, batch, block_name, longest_first):
    """grid and grid_names of a kernel with one CTA per (head, block, batch row). Mosaic GPU maps the
    last grid axis to blockIdx.x, which the GPU launches first: longest_first puts the blocks
    outermost so that the heaviest (causal: the last query blocks, the first key blocks; see
    `block_index`) start first and the light ones fill the tail, with the heads of one GQA group
    side by side (they read the same K/V). Otherwise head-major, batch innermost (the old order)."""
    if longest_first:
        return (blocks, batch, heads), (block_name, "b", "h")
    return (heads, blocks, batch), ("h", block_name, "b")


def block_index(block_name, blocks, longest_first, heavy_last):
    """This CTA's block along the sequence: reversed when the heaviest blocks are the last ones
    (query blocks under causal masking) so that they get the first launch slots."""
    i = lax.axis_index(block_name)
    return blocks - 1 - i if longest_first and heavy_last else i


def launch_kernel(entry, out_type, *, compiler_params, zero_outputs=False, interpret=None, **mesh):
    """plgpu.kernel(entry, ...) as a function of the kernel's arguments, which may include mutable
    `jax.new_ref` arrays (accumulators the kernel adds into: those go through pl.kernel, which aliases
    them in and out). mesh: plgpu.Mesh's arguments (grid, grid_names, num_threads, thread_name).
    zero_outputs (interpreter only): the outputs start as zeros, not NaN."""
    if zero_outputs:
        assert interpret is not None, "zero_outputs: the interpreter only"
        interpret = dataclasses.replace(interpret, uninitialized_memory="zero")

    def call(*args):
        if not any(isinstance(a, jax.Ref) for a in args):
            return plgpu.kernel(entry, out_type=tuple(out_type), compiler_params=compiler_params,
                                interpret=interpret, **mesh)(*args)
        return pl.kernel(entry, out_type=tuple(out_type), mesh=plgpu.Mesh(**mesh),
                         compiler_params=compiler_params, interpret=interpret)(*args)
    return call


class Values:
    """Register values of a Mosaic GPU kernel, compiled (explicit WGMMA layouts) or under JAX's
    Mosaic GPU interpreter (plain arrays: it has no layout_cast and no load with a layout)."""

    def __init__(self, interp: bool):
        self.interp = interp

    def cast(self, x, layout):
        return x if self.interp else plgpu.layout_cast(x, layout)

    def index_vec(self, n, dim):
        """0..n-1 as a [n] vector along the rows (dim 0) or columns (dim 1) of a tile."""
        if self.interp:
            return lax.broadcasted_iota(jnp.int32, (n,), 0)
        return plgpu.broadcasted_iota(jnp.int32, (n,), 0, layout=plgpu.Layout.WGMMA.reduce(1 - dim))

    def compare_positions(self, shape, row0, col0, op, vectors=True):
        """op(row0 + r, col0 + c) over a [rows, cols] tile (bool), from index vectors broadcast to
        it. vectors=False: from 2-D iotas, a divide and a remainder per element that the compiler
        hoists out of the loops into two values per element held for the whole kernel: in dk/dv
        they spilled (vectors: 1.09x / 1.02x / 1.00x at 2k / 8k / 32k, spills 632 -> 412 B; dq
        1.01x / 1.00x / 1.07x), in the forward, with registers to spare, they are 1.05x faster at
        2k (H200, benchmarks/RESULTS.md session 14)."""
        if not vectors:
            iota = (lambda d: lax.broadcasted_iota(jnp.int32, shape, d)) if self.interp else (
                lambda d: plgpu.broadcasted_iota(jnp.int32, shape, d, layout=plgpu.Layout.WGMMA))
            return op(iota(0) + row0, iota(1) + col0)
        rows = self.index_vec(shape[0], 0) + (row0 - col0)
        cols = self.index_vec(shape[1], 1)
        return op(lax.broadcast_in_dim(rows, shape, [0]), lax.broadcast_in_dim(cols, shape, [1]))

    def vec(self, ref, dim):
        """A [n] vector from shared memory, along the rows (dim 0) or columns (dim 1) of a tile."""
        if self.interp:
            return ref[...]
        return plgpu.load(ref, (), layout=plgpu.Layout.WGMMA.reduce(1 - dim))


def scores_log2(s, scale, val, q0, k0, masked, seg_rows=None, seg_cols=None, mask_vectors=True, window=None):
    """QK^T scores [queries, keys] times scale * log2(e) (scale None: left unscaled), -inf where
    causal masking hides a key (masked: the tile crosses the diagonal, or a window edge; q0 / k0: its
    first query / key), the sliding window does (window: W, a scalar, or None: query i sees key j
    iff i - j < W; only where masked) or it is in another segment (seg_rows / seg_cols: the ids
    along the rows / columns, or None). val: `Values`; mask_vectors: see `Values.compare_positions`."""
    if scale is not None:
        s = s * (scale * LOG2E)
    if masked:
        s = jnp.where(val.compare_positions(s.shape, q0, k0, operator.ge, mask_vectors), s, -jnp.inf)
        if window is not None:  # key k0 + c >= query q0 + r - W + 1
            s = jnp.where(val.compare_positions(s.shape, q0 - window + 1, k0, operator.le, mask_vectors), s, -jnp.inf)
    if seg_rows is not None:
        same = (lax.broadcast_in_dim(seg_rows, s.shape, [0]) == lax.broadcast_in_dim(seg_cols, s.shape, [1]))
        s = jnp.where(same, s, -jnp.inf)
    return s


def probs_keys_first(s_t, lse_of, val, k0, q0, *, scale, masked, softcap=None, window=None, seg=None):
    """P^T [keys, queries] of one tile of the dk/dv kernels from its raw products S^T = K Q^T (k0 / q0:
    the tile's first key / query), float32, and the softcap's tanh (or None): the scale (with a
    softcap c, c tanh(scale s / c) first) in log2 units, -inf where causal masking (masked: the tile
    crosses the diagonal), the sliding window W or the segments (seg: (key ids value, query ids ref))
    hide a pair, then exp2 against lse_of() (the queries' lse, a value along the columns)."""
    t_rows, t_cols = s_t.shape
    tanh = None
    if softcap:
        s_t, tanh = soft_cap(s_t, scale, softcap)
    s_t = s_t * ((1.0 if softcap else scale) * LOG2E)
    if masked:  # key k0 + r sees query q0 + c iff k0 + r <= q0 + c
        s_t = jnp.where(val.compare_positions(s_t.shape, k0, q0, operator.le), s_t, -jnp.inf)
    if window is not None:  # ... and q0 + c - (k0 + r) < W
        s_t = jnp.where(val.compare_positions(s_t.shape, k0 + window, q0, operator.gt), s_t, -jnp.inf)
    if seg is not None:
        key_ids, q_ids = seg
        same = (lax.broadcast_in_dim(key_ids, s_t.shape, [0])
                == lax.broadcast_in_dim(val.vec(q_ids, 1), s_t.shape, [1]))
        s_t = jnp.where(same, s_t, -jnp.inf)
    return jnp.exp2(s_t - lax.broadcast_in_dim(lse_of(), (t_rows, t_cols), [1])), tanh


def check_regs(regs):
    """setmaxnreg settings (consumer, producer) for 2 consumer + 1 producer warpgroups, or None."""
    if regs is not None:
        assert all(r % 8 == 0 and 24 <= r <= 256 for r in regs), regs
        assert 256 * regs[0] + 128 * regs[1] <= 65536, regs


def run_consumers(wg, consumer, static):
    """consumer(index) on the two consumer warpgroups (wg < 2). static: each runs its own copy of the
    code with its index a constant to the compiler, so the buffer addresses that depend on it and
    their wgmma descriptors become immediates instead of registers held (and spilled) for the whole
    kernel. The index is traced as wg * 0 + w: a Python int trips JAX 0.11's Mosaic lowering inside
    loops ("Shaped arrays must be represented by ir.Values")."""
    if not static:
        return consumer(wg)
    for w in range(2):
        pl.when(wg == w)(functools.partial(consumer, wg * 0 + w))


def rotate_halves(x_parts, c_ref, s_ref, rows, chunk):
    """In-place RoPE of a [2, rows, D/2] (halves) shared-memory tile by cos/sin [rows, D/2], in
    `chunk`-row pieces (64: the smallest the WGMMA register layout tiles), float32 math."""
    for r0 in range(0, rows, chunk):
        sl = pl.ds(r0, chunk)
        x1 = x_parts.at[0, sl][...].astype(jnp.float32)
        x2 = x_parts.at[1, sl][...].astype(jnp.float32)
        c = c_ref.at[sl][...].astype(jnp.float32)
        s = s_ref.at[sl][...].astype(jnp.float32)
        x_parts.at[0, sl][...] = (x1 * c - x2 * s).astype(x_parts.dtype)
        x_parts.at[1, sl][...] = (x2 * c + x1 * s).astype(x_parts.dtype)


class QTiles:
    """Which tiles (query block qi, batch row b, head h) each CTA of a Q-stationary kernel (the
    forward, dq) runs. ctas None: one CTA per tile, in `cta_grid`'s order. An int: a persistent
    kernel of that many CTAs (one per SM), each looping over tiles in longest-first order, round
    by round, snaking (CTA c takes the c-th tile of even rounds and the c-th from the end of odd
    ones) so that the CTAs get about equal work. Persistence is for the per-CTA fixed cost: the
    producer streams the next tile's K/V while the consumers finish the last one.

    head_chunk (persistent only): None, longest first across every (batch row, head), so the CTAs
    running at once read the K/V of every head; an int (a multiple of the GQA group dividing heads),
    longest first within chunks of that many heads of one batch row, chunk after chunk, so that
    they read the K/V of head_chunk / group heads (an L2-sized working set at long T).

    steps (persistent only): None, the snake above; else a function qi -> that query block's key
    steps, and the tiles go, in the same global order, each to the CTA whose modelled work (its
    steps + TILE_COST) ends first: a list schedule, computed here (`list_schedule`) and read by the
    kernel from a table (`table`, then `bind`; `tile_at` decodes a position either way). The static
    snake balances chunked orders badly (benchmarks/launch_order_model.py: heads by 8 at 1.235x the
    ideal at 8k, the default 1.031x at 2k; the list schedule 1.001-1.009x). On one H100 call
    (attention_NOTES.md session 25) both were level with the snake at 2k / 8k."""

    TILE_COST = 1.0  # a tile's fixed work (Q load, epilogue) in key steps, for the list schedule

    def __init__(self, batch, heads, blocks, ctas, longest_first, head_chunk=None, steps=None):
        self.batch, self.heads, self.blocks, self.longest_first = batch, heads, blocks, longest_first
        assert head_chunk is None or (ctas is not None and heads % head_chunk == 0), (heads, head_chunk, ctas)
        assert steps is None or ctas is not None, "steps: a persistent kernel's list schedule"
        self.head_chunk = head_chunk
        self.tiles = batch * heads * blocks
        self.ctas = None if ctas is None else max(1, min(int(ctas), self.tiles))
        if self.ctas is None:
            self.grid, self.grid_names = cta_grid(heads, blocks, batch, "q", longest_first)
        else:
            self.grid, self.grid_names = (self.ctas,), ("cta",)
        self.table = None if steps is None else self._schedule_table(steps)
        self.row = None  # this CTA's row of `table` (a ref or an array), once bound

    def _schedule_table(self, steps):
        """int32 [ctas, rows, 128]: per CTA its tile count, then the global positions of its tiles
        in order (flattened, zero padded), as `list_schedule` assigns them."""
        work = [steps(qi) + self.TILE_COST for qi in self._query_blocks_in_order()]
        lists = list_schedule(work, self.ctas)
        width = 128 * -(-(1 + max(map(len, lists))) // 128)  # TMA boxes: 128 int32 a row
        table = np.zeros((self.ctas, width), np.int32)
        for c, ts in enumerate(lists):
            table[c, :1 + len(ts)] = [len(ts), *ts]
        return table.reshape(self.ctas, width // 128, 128)

    def _query_blocks_in_order(self):
        """The query block qi of each global position t, as host ints."""
        with jax.ensure_compile_time_eval():  # concrete even while the caller is traced
            qi, _, _ = self.tile_at(jnp.arange(self.tiles, dtype=jnp.int32))
        return np.asarray(qi).tolist()

    def bind(self, row):
        """These tiles reading the list schedule from `row` (this CTA's row of `table`, [rows, 128])."""
        bound = copy.copy(self)
        bound.row = row
        return bound

    def _entry(self, i):
        i = jnp.asarray(i, jnp.int32)
        return self.row[lax.div(i, jnp.int32(128)), lax.rem(i, jnp.int32(128))]

    def count(self):
        """How many tiles this CTA runs (a Python int without persistence)."""
        if self.ctas is None:
            return 1
        if self.table is not None:
            return self._entry(0)
        rounds, rest = divmod(self.tiles, self.ctas)
        c = lax.axis_index("cta")
        in_last = (c < rest) if rounds % 2 == 0 else (c >= self.ctas - rest)  # the partial round
        return rounds + in_last.astype(jnp.int32)

    def coords(self, i):
        """(qi, b, h) of this CTA's i-th tile."""
        if self.ctas is None:
            qi = block_index("q", self.blocks, self.longest_first, heavy_last=True)
            return qi, lax.axis_index("b"), lax.axis_index("h")
        if self.table is not None:
            return self.tile_at(self._entry(i + 1))
        c = lax.axis_index("cta")
        return self.tile_at(i * self.ctas + jnp.where(lax.rem(i, 2) == 0, c, self.ctas - 1 - c))

    def tile_at(self, t):
        """(qi, b, h) of global position t (int32) of the persistent tile order."""
        if self.head_chunk is None:
            per_block = self.batch * self.heads  # the heads of a GQA group side by side (same K/V)
            qi = self.blocks - 1 - lax.div(t, jnp.int32(per_block))
            r = lax.rem(t, jnp.int32(per_block))
            return qi, lax.div(r, jnp.int32(self.heads)), lax.rem(r, jnp.int32(self.heads))
        hc = self.head_chunk
        u, w = lax.div(t, jnp.int32(self.blocks * hc)), lax.rem(t, jnp.int32(self.blocks * hc))
        chunks = self.heads // hc  # u: (batch row, chunk) in row-major order
        h = lax.rem(u, jnp.int32(chunks)) * hc + lax.rem(w, jnp.int32(hc))
        return self.blocks - 1 - lax.div(w, jnp.int32(hc)), lax.div(u, jnp.int32(chunks)), h


def list_schedule(work, ctas):
    """Each job of `work` (its cost), in order, to the CTA whose assigned work ends first (ties: the
    lowest index): the positions of each CTA's jobs, in order. Greedy list scheduling, as a GPU's
    block scheduler would run them, computed ahead so that the kernel reads it from a table."""
    free = [(0.0, c) for c in range(ctas)]
    lists = [[] for _ in range(ctas)]
    for t, w in enumerate(work):
        end, c = heapq.heappop(free)
        lists[c].append(t)
        heapq.heappush(free, (end + w, c))
    return lists


def load_schedule(tiles, table_ref, row, bar, wg, loader=2):
    """`tiles` bound to this CTA's row of the list schedule (`QTiles.table`), copied into shared
    memory `row` by warpgroup `loader` (one TMA on `bar`) and waited for by every warpgroup. No
    table (no list schedule): `tiles` as they are."""
    if tiles.table is None:
        return tiles

    @pl.when(wg == loader)
    def _():
        plgpu.copy_gmem_to_smem(table_ref.at[lax.axis_index("cta")], row, bar)
    plgpu.barrier_wait(bar)
    return tiles.bind(row)


def for_each_tile(tiles, kv_range, body):
    """body(i, tile, kv_min, kv_max, off) for each of this CTA's tiles in order, tile = (qi, b, h),
    its key tiles [kv_min, kv_max) = kv_range(*tile); off: the K/V steps run before this tile minus
    kv_min, so that key tile j of this tile is global step j + off (its slot: (j + off) % stages).
    Returns the number of steps of all tiles."""
    def run(i, g):
        tile = tiles.coords(i)
        lo, hi = kv_range(*tile)
        body(i, tile, lo, hi, g - lo)
        return g + hi - lo
    n = tiles.count()
    if isinstance(n, int) and n == 1:
        return run(jnp.int32(0), jnp.int32(0))
    return lax.fori_loop(jnp.int32(0), n, run, jnp.int32(0))


def when_any_tile(tiles, f, after=None):
    """f() if this CTA has a tile after its `after`-th (None: any tile at all)."""
    n = tiles.count()
    if isinstance(n, int):  # one tile each
        if after is None:
            f()
        return
    pl.when(n > (0 if after is None else after + 1))(f)


def run_key_steps(step, scores, carry, kv_min, first_masked, kv_steps, early):
    """A Q-stationary consumer's key steps [kv_min, kv_steps), masked from first_masked on.
    step(j, carry, s, masked, next_qk) -> (carry, next s or None), where s is step j's raw product
    (scores(j): the wgmmas issued and waited for). early: each step issues step j + 1's product
    right behind its own last wgmma (next_qk) and waits for both at once, so s comes from step
    j - 1 (the first from scores(kv_min)); the last step is peeled: it issues nothing further.
    Returns the carry."""
    last = kv_steps - 1 if early else kv_steps
    if early:  # the peeled step must not run in the loops too (causal: the last step is masked anyway)
        first_masked = jnp.minimum(first_masked, last)

    def loop(lo, hi, c, masked):
        if early:
            return lax.fori_loop(lo, hi, lambda j, c: step(j, *c, masked, True), c)
        return lax.fori_loop(lo, hi, lambda j, c: step(j, c, scores(j), masked, False)[0], c)
    c = (carry, scores(kv_min)) if early else carry
    c = loop(first_masked, last, loop(kv_min, first_masked, c, False), True)
    return step(last, *c, True, False)[0] if early else c


def causal_kv_range(rng_ref, bk=BLOCK_K, win_ref=None):
    """kv_range of a Q-stationary kernel (for_each_tile): query block qi's `bk`-key tiles under
    causal masking, from the first one sharing a segment (rng_ref: segment_ranges(seg)[0], in
    BLOCK_K tiles whatever bk, or None) and holding a key inside the sliding window of the block's
    first row (win_ref: the window W as int32 [1], or None)."""
    def kv_range(qi, b, h):
        del h
        hi = lax.div(qi * BLOCK_Q + BLOCK_Q + bk - 1, jnp.int32(bk))
        lo = jnp.int32(0)
        if rng_ref is not None:
            lo = lax.div(rng_ref[b, qi, 0], jnp.int32(bk // BLOCK_K))  # the bk tile holding that key
        if win_ref is not None:
            lo = jnp.maximum(lo, lax.div(jnp.maximum(qi * BLOCK_Q - win_ref[0] + 1, 0), jnp.int32(bk)))
        return lo, hi
    return kv_range


def step_slot(j, off, stages):
    return lax.rem(j + off, jnp.int32(stages))


def skip_kv_steps(bars, start, stop, off, stages, v_consumed=None):
    """A consumer's steps [start, stop) that only the other consumer needs: wait and arrive anyway,
    so every barrier phase is observed by every waiter (the interpreter checks it; waiting too, not
    only arriving as JAX's own kernel does, measured 15% faster at 2k). bars: (K, V, consumed);
    v_consumed: V's own release barrier where V is handed back apart from K (dq's early_v)."""
    kbar, vbar, consumed = bars

    def skip(j, _):
        slot = step_slot(j, off, stages)
        plgpu.barrier_wait(vbar.at[slot])
        if v_consumed is not None:
            plgpu.barrier_arrive(v_consumed.at[slot])
        plgpu.barrier_wait(kbar.at[slot])
        plgpu.barrier_arrive(consumed.at[slot])
    lax.fori_loop(start, stop, skip, None)


def kv_producer(refs, bufs, bars, *, tiles, kv_range, group, table_b, stages, bk):
    """The producer warpgroup of the forward and dq kernels: streams the key tiles of all of this
    CTA's tiles (K halves, cos/sin and segment ids on the "raw" barrier, V on its own) through
    `stages` slots, refilling a slot once both consumers arrived on its "consumed" barrier. With
    RoPE tables it rotates each K tile once in shared memory, one step behind the loads, and releases
    it on "K ready"; without, the consumers wait on "raw" itself.
    refs: (k, v, cos, sin, seg) in GMEM; bufs: (K halves, cos, sin, ids, V) slots; bars: (raw,
    ready, V, consumed[, V consumed]). cos/sin (seg) and their buffers are None without RoPE (segment
    ids). With a "V consumed" barrier (not None) V's slot is refilled once both consumers arrived on
    it, ahead of K's. group: query heads per K/V head; table_b: batch rows of the tables (1: shared)."""
    k_ref, v_ref, cos_ref, sin_ref, seg_ref = refs
    kh, ck, sk, segk, vs = bufs
    kraw, kready, vbar, consumed, v_consumed = (*bars, None)[:5]
    half = kh.shape[-1]
    rope = cos_ref is not None

    def issue_v(b, kvh, step, slot):
        plgpu.copy_gmem_to_smem(v_ref.at[b, pl.ds(step * bk, bk), kvh], vs.at[slot], vbar.at[slot])

    def issue(b, kvh, step, slot):
        rows = pl.ds(step * bk, bk)
        for part in range(2):
            plgpu.copy_gmem_to_smem(k_ref.at[b, rows, kvh, pl.ds(part * half, half)], kh.at[slot, part], kraw.at[slot])
        if rope:
            tb = b if table_b > 1 else 0
            plgpu.copy_gmem_to_smem(cos_ref.at[tb, rows], ck.at[slot], kraw.at[slot])
            plgpu.copy_gmem_to_smem(sin_ref.at[tb, rows], sk.at[slot], kraw.at[slot])
        if seg_ref is not None:
            plgpu.copy_gmem_to_smem(seg_ref.at[b, rows], segk.at[slot], kraw.at[slot])
        if v_consumed is None:
            issue_v(b, kvh, step, slot)

    def rotate(g):  # global step g's K tile, loaded one step earlier: rotate and release it
        slot = step_slot(g, 0, stages)
        plgpu.barrier_wait(kraw.at[slot])
        rotate_halves(kh.at[slot], ck.at[slot], sk.at[slot], bk, 64)
        plgpu.commit_smem()  # fence.proxy.async + warpgroup barrier before the release
        plgpu.barrier_arrive(kready.at[slot])

    def stream_tile(i, tile, kv_min, kv_max, off):
        del i
        _, b, h = tile
        kvh = lax.div(h, jnp.int32(group))

        def step(j, _):
            g = j + off
            slot = step_slot(j, off, stages)

            def wait_release(bar):  # the slot's previous step was released
                pl.when(g >= stages)(lambda: plgpu.barrier_wait(bar.at[slot]))
            if v_consumed is not None:
                wait_release(v_consumed)
                issue_v(b, kvh, j, slot)
            wait_release(consumed)
            issue(b, kvh, j, slot)
            if rope:
                @pl.when(g >= 1)
                def _():
                    rotate(g - 1)
        lax.fori_loop(kv_min, kv_max, step, None)

    g = for_each_tile(tiles, kv_range, stream_tile)
    if rope:
        @pl.when(g >= 1)
        def _():
            rotate(g - 1)

    def drain(j, _):  # the last steps' slots are not refilled: observe their release anyway
        for bar in (v_consumed, consumed):
            if bar is not None:
                plgpu.barrier_wait(bar.at[step_slot(j, 0, stages)])
    lax.fori_loop(jnp.maximum(g - stages, 0), g, drain, None)


def sm_count():
    """Streaming multiprocessors of the default device (the CTAs of a persistent kernel)."""
    return getattr(jax.devices()[0], "core_count", None) or 132


def mosaic_forward(q, k, v, cos=None, sin=None, seg=None, *, ranges=None, scale, stages=None, regs="auto",
                   longest_first=True, ctas=None, key_block=BLOCK_K, pingpong=False, fold_scale=True,
                   early_qk=False, head_chunk=None, schedule="snake", window=None, softcap=None, interpret=None):
    """q [B, T, Hq, D], k/v [B, T, Hkv, D] (D = 128 or 256, T % 128 == 0, 16-bit), cos/sin [B|1, T, D/2]
    (float16, D = 128 only; None: no RoPE), seg [B, T] int32 segment ids or None (ranges: segment_ranges(seg)[0]
    if already computed). Returns o [B, T, Hq, D] and lse
    [B, Hq, T] (log2-sum-exp2 of the scores times scale * log2(e), as the Triton kernels keep it).

    D = 256 (WIDE_HEAD_DIM): 64-key steps in 2 stages and the output through the Q buffer (Q and
    two K/V slots take 192 KB of shared memory); each consumer's O is 64x256 fp32, 128 registers a
    thread, so regs "auto" gives the consumers 240.

    stages: K/V slots in flight (None: 3 for 64-key tiles, 2 for 128 or D = 256). key_block: keys per step
      (64, or 128 without RoPE tables: half the steps and their fixed work, QK^T at N = 128;
      1.10x / 1.11x at 2k / 8k on the H200, persistent, `Tuning.mosaic_fwd_key_block`).
      pingpong (key_block 128): the consumers take turns on the tensor cores (one's QK^T, the
      other's, one's PV, the other's), so one's softmax runs under the other's wgmmas (FA3's
      schedule; measured no faster than 128-key steps without it). regs: (consumer, producer) registers per thread for setmaxnreg
      (2*128*c + 128*p <= 65536), or None. longest_first: launch order (`cta_grid`).
      ctas: None, one CTA per 128 query rows of a head; an int ("sms": the device's SM count), a
      persistent kernel (`QTiles`). fold_scale: keep the running row max in raw score units and
      apply scale * log2(e) inside each exponent (exp2(s c - m c): one FFMA an element where the
      scaled scores cost a multiply and a subtract; tokamax's and FA3's softmax; 1.014x at 32k, neutral
      at 2k / 8k on the H200, attention_NOTES.md session 15).
      early_qk: each step issues the next step's QK^T right behind its PV and waits once for both,
      so a consumer no longer waits for its PV before the next QK^T starts (the forward's warps sat
      9.7% of their samples on that wait, attention_NOTES.md session 16). Not with pingpong.
      head_chunk (persistent): the tile order's heads per chunk (`QTiles`); None: all heads.
      schedule (persistent): "snake", QTiles' static snake; "list", a list schedule of the same order
      that balances the CTAs' modelled work, read from a table (QTiles steps).
      regs "auto": (200, 104) at D = 128, (240, 24) at D = 256 (no tables: the producer only issues copies).
      window: a sliding window W (int or int32 scalar; query i sees key j iff i - j < W) or None:
      each tile starts at the key tile its first row's window reaches, and every tile is masked.
      softcap: c (Gemma-2's logit softcap: scores become c tanh(scale q.k / c)) or None; the scale
      is then applied before the cap, not folded into the exponent.
      interpret: InterpretGPUParams to run on the CPU.
    Both were picked on the H100 (attention_NOTES.md session 4: 3 stages with (200, 104) fastest).
    Without RoPE tables (at D = 128) the output leaves through its own buffer, so a consumer loads its
    next Q tile before writing the last one out; with them or at D = 256 (no shared memory left)
    through the Q buffer."""
    B, T, Hq, D = q.shape
    Hkv = k.shape[2]
    G = Hq // Hkv
    half, bq, cta_q, bk = D // 2, BLOCK_Q // 2, BLOCK_Q, key_block
    assert D in (HEAD_DIM, WIDE_HEAD_DIM) and T % cta_q == 0, (q.shape, "see supported()")
    assert bk in (64, 128), key_block
    wide = D == WIDE_HEAD_DIM
    refuse_wide_tables("mosaic_forward", D, cos)
    assert not wide or bk == 64, "D=256: key_block=64 (two slots of 128 keys would take 256 KB)"
    assert head_chunk is None or head_chunk % G == 0, ("head_chunk: whole GQA groups", head_chunk, G)
    assert not pingpong or bk == 128, "pingpong: key_block=128 (both consumers then run the same steps)"
    assert not (pingpong and early_qk), "early_qk issues QK^T outside the ping-pong turns"
    if bk != BLOCK_K and cos is not None:
        raise ValueError("mosaic_forward: key_block=128 takes no RoPE tables (their slots would not fit "
                         "in shared memory); rotate q/k before the call (Tuning.rope_in_kernel=False)")
    if stages is None:  # 3 slots of 128 keys (or of 64 at D = 256) would take 256 KB of shared memory
        stages = 3 if bk == 64 and not wide else 2
    if regs == "auto":
        regs = (240, 24) if wide else (200, 104)
    rope = cos is not None
    # the producer releases K(j + 1) rotated one load later, into the slot step j - 1 + stages frees
    assert not (early_qk and rope and stages < 3), "early_qk with RoPE tables: stages >= 3"
    segs = seg is not None
    windowed = window is not None
    table_b = cos.shape[0] if rope else 1
    interp = interpret is not None
    p_smem = interp  # the interpreter has no register A operand for wgmma
    own_out = not rope and not wide  # a separate output buffer: the next Q tile loads under the epilogue
    check_regs(regs)

    unit = 1.0 if softcap else scale  # a softcap takes the scale in before the cap
    fold_scale = fold_scale or softcap is not None  # (then the "raw" scores are the capped ones)

    def log2_units(x):  # fold_scale: raw scores -> the exponent's units (the product fuses into the FFMA)
        return x * (unit * LOG2E) if fold_scale else x

    val = Values(interp)
    cast, vec = val.cast, val.vec
    assert schedule in ("snake", "list"), schedule
    plan = QTiles(B, Hq, T // cta_q, sm_count() if ctas == "sms" else ctas, longest_first, head_chunk,
                  steps=(lambda qi: (qi * cta_q + cta_q + bk - 1) // bk)  # causal_kv_range's hi, on the host
                  if schedule == "list" and ctas else None)

    def kernel(q_ref, k_ref, v_ref, cos_ref, sin_ref, seg_ref, rng_ref, win_ref, sched_ref, o_ref, lse_ref, scratch):
        # cos_ref / sin_ref (and their buffers) are None without RoPE, seg_ref / rng_ref without
        # segments, sched_ref (and its row, barrier) without a list schedule
        ((qh, oh, cq, sq, kh, ck, sk, vs, ps, lses, segq, segk, sched),
         (qbar, kraw, kready, vbar, consumed, turn, sched_bar)) = scratch
        wg = lax.axis_index("wg")
        tiles = load_schedule(plan, sched_ref, sched, sched_bar, wg)

        def my_turn():  # pingpong: wait until the other consumer issued its wgmmas
            if pingpong:
                plgpu.barrier_wait(turn.at[wg])

        def your_turn():
            if pingpong:
                plgpu.barrier_arrive(turn.at[1 - wg])
        kbar = kready if rope else kraw  # what a consumer waits for before reading a K tile

        kv_range = causal_kv_range(rng_ref, bk, win_ref)
        w_size = win_ref[0] if windowed else None

        @pl.when(wg < 2)
        def _consumer():
            if regs and not interp:
                plgpu.set_max_registers(regs[0], action="increase")
            my_q, my_bar = qh.at[wg], qbar.at[wg]
            my_o = oh.at[wg] if own_out else my_q
            my_cq, my_sq = (cq.at[wg], sq.at[wg]) if rope else (None, None)

            def load_q(qi, b, h):
                q0 = qi * cta_q + wg * bq
                tb = b if table_b > 1 else 0
                for part in range(2):
                    plgpu.copy_gmem_to_smem(q_ref.at[b, pl.ds(q0, bq), h, pl.ds(part * half, half)], my_q.at[part], my_bar)
                if rope:
                    plgpu.copy_gmem_to_smem(cos_ref.at[tb, pl.ds(q0, bq)], my_cq, my_bar)
                    plgpu.copy_gmem_to_smem(sin_ref.at[tb, pl.ds(q0, bq)], my_sq, my_bar)
                if segs:
                    plgpu.copy_gmem_to_smem(seg_ref.at[b, pl.ds(q0, bq)], segq.at[wg], my_bar)

            def run_tile(i, tile, kv_min, kv_max, off):
                qi, b, h = tile
                q0 = qi * cta_q + wg * bq
                if not own_out:
                    plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the last output left the Q buffer
                    load_q(qi, b, h)
                plgpu.barrier_wait(my_bar)
                if rope:
                    rotate_halves(my_q, my_cq, my_sq, bq, bq)
                    plgpu.commit_smem()  # generic-proxy writes -> visible to wgmma (async proxy)
                seg_rows = vec(segq.at[wg], 0) if segs else None
                kv_steps = lax.div(q0 + bq + bk - 1, jnp.int32(bk))

                def issue_qk(acc, slot):
                    for p in range(2):
                        plgpu.wgmma(acc, my_q.at[p], plgpu.transpose_ref(kh.at[slot, p], (1, 0)))

                def raw_scores(j):  # Q K(j)^T in fp32, once K(j) is in
                    slot = step_slot(j, off, stages)
                    plgpu.barrier_wait(kbar.at[slot])
                    my_turn()
                    if interp:  # the interpreter's wgmma takes no transposed operand
                        s = sum(lax.dot_general(my_q.at[p][...], kh.at[slot, p][...], (((1,), (1,)), ((), ())),
                                                preferred_element_type=jnp.float32) for p in range(2))
                        your_turn()
                        return s

                    def qk(acc):
                        issue_qk(acc, slot)
                        your_turn()
                        plgpu.wgmma_wait(0)
                        return acc[...]
                    return pl.run_scoped(qk, plgpu.ACC((bq, bk), jnp.float32))

                def softmax(s, m, l, j, slot, masked):  # raw scores -> P (16-bit), the rows' new state, O's rescale
                    if softcap:
                        s, _ = soft_cap(s, scale, softcap)
                    s = scores_log2(s, None if fold_scale else scale, val, q0, j * bk, masked, seg_rows,
                                    vec(segk.at[slot], 1) if segs else None, mask_vectors=False, window=w_size)
                    m_new = jnp.maximum(m, s.max(axis=1))  # fold_scale: in raw score units
                    alpha = jnp.exp2(log2_units(m - m_new))
                    p16 = jnp.exp2(log2_units(s) - lax.broadcast_in_dim(log2_units(m_new), s.shape, [0]))
                    l = l * alpha + p16.sum(axis=1)
                    return p16.astype(q.dtype), alpha, m_new, l

                def pv(o, p16, j, slot, next_qk):
                    """(o + P V(j), None); next_qk: QK^T of step j + 1 is issued right behind the PV wgmma,
                    both are waited for once, and its raw scores come back in place of None."""
                    plgpu.barrier_wait(vbar.at[slot])
                    if p_smem:
                        ps.at[wg][...] = p16
                        plgpu.commit_smem()  # generic-proxy writes of P -> visible to wgmma
                        my_turn()

                        def run(acc):
                            plgpu.wgmma(acc, ps.at[wg], vs.at[slot])
                            your_turn()
                            return acc[...]
                        o = o + pl.run_scoped(run, plgpu.ACC((bq, D), jnp.float32))
                        return o, raw_scores(j + 1) if next_qk else None
                    my_turn()
                    if not next_qk:
                        def run(acc_ref):
                            plgpu.wgmma(acc_ref, p16, vs.at[slot])
                            your_turn()
                        return pl.run_state(run)(plgpu.ACC.init(o)), None
                    next_slot = step_slot(j + 1, off, stages)

                    def run_both(accs):
                        o_acc, s_acc = accs
                        plgpu.wgmma(o_acc, p16, vs.at[slot])
                        plgpu.barrier_wait(kbar.at[next_slot])
                        issue_qk(s_acc, next_slot)
                    zeros = cast(jnp.zeros((bq, bk), jnp.float32), plgpu.Layout.WGMMA)
                    return pl.run_state(run_both)((plgpu.ACC.init(o), plgpu.ACC.init(zeros)))

                def step(j, carry, s, masked, next_qk):  # one key tile from its raw scores s
                    o, m, l = carry
                    slot = step_slot(j, off, stages)
                    p16, alpha, m, l = softmax(s, m, l, j, slot, masked)
                    o, s = pv(o * lax.broadcast_in_dim(alpha, o.shape, [0]), p16, j, slot, next_qk)
                    plgpu.barrier_arrive(consumed.at[slot])
                    return (o, m, l), s

                o = cast(jnp.zeros((bq, D), jnp.float32), plgpu.Layout.WGMMA)
                # finite: with segments a row may see no key of a tile (exp2(-inf - -inf) would be NaN)
                m = cast(jnp.full((bq,), -1e30, jnp.float32), plgpu.Layout.WGMMA.reduce(1))
                l = cast(jnp.zeros((bq,), jnp.float32), plgpu.Layout.WGMMA.reduce(1))
                first_masked = kv_min if segs or windowed else lax.div(q0, jnp.int32(bk))  # else the diagonal on
                o, m, l = run_key_steps(step, raw_scores, (o, m, l), kv_min, first_masked, kv_steps, early_qk)

                skip_kv_steps((kbar, vbar, consumed), kv_steps, kv_max, off, stages)
                if own_out:  # every wgmma reading Q was waited for: the next tile's Q comes in now
                    when_any_tile(tiles, lambda: load_q(*tiles.coords(i + 1)), after=i)
                    plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the last output left my_o

                o = (o / lax.broadcast_in_dim(l, o.shape, [0])).astype(q.dtype)
                for part in range(2):
                    my_o.at[part][...] = o[:, part * half:(part + 1) * half]
                lses.at[wg][...] = log2_units(m) + jnp.log2(l)
                plgpu.commit_smem()
                for part in range(2):
                    plgpu.copy_smem_to_gmem(my_o.at[part], o_ref.at[b, pl.ds(q0, bq), h, pl.ds(part * half, half)])
                plgpu.copy_smem_to_gmem(lses.at[wg], lse_ref.at[b, h, pl.ds(q0, bq)])

            if own_out:
                when_any_tile(tiles, lambda: load_q(*tiles.coords(jnp.int32(0))))
            if pingpong:  # the lower rows go first; their last turn is observed below
                pl.when(wg == 1)(lambda: plgpu.barrier_arrive(turn.at[0]))
            for_each_tile(tiles, kv_range, run_tile)
            if pingpong:
                pl.when(wg == 0)(lambda: plgpu.barrier_wait(turn.at[0]))
            plgpu.wait_smem_to_gmem(0)

        @pl.when(wg == 2)
        def _producer():
            if regs and not interp:
                plgpu.set_max_registers(regs[1], action="decrease")

            kv_producer((k_ref, v_ref, cos_ref, sin_ref, seg_ref), (kh, ck, sk, segk, vs),
                        (kraw, kready, vbar, consumed), tiles=tiles, kv_range=kv_range, group=G,
                        table_b=table_b, stages=stages, bk=bk)

    def entry(q_ref, k_ref, v_ref, *refs):
        refs = list(refs)
        cos_ref, sin_ref = (refs.pop(0), refs.pop(0)) if rope else (None, None)
        seg_ref, rng_ref = (refs.pop(0), refs.pop(0)) if segs else (None, None)
        win_ref = refs.pop(0) if windowed else None
        sched_ref = refs.pop(0) if plan.table is not None else None
        o_ref, lse_ref = refs
        smem = lambda shape, dt: plgpu.SMEM(shape, dt, transforms=smem_tiles())  # noqa: E731
        table = (lambda shape: smem(shape, cos.dtype)) if rope else (lambda shape: None)
        buffers = (smem((2, 2, bq, half), q.dtype), smem((2, 2, bq, half), q.dtype) if own_out else None,
                   table((2, bq, half)), table((2, bq, half)),
                   smem((stages, 2, bk, half), k.dtype), table((stages, bk, half)),
                   table((stages, bk, half)), smem((stages, bk, D), v.dtype),
                   smem((2, bq, bk), q.dtype) if p_smem else None,
                   plgpu.SMEM((2, bq), jnp.float32),
                   plgpu.SMEM((2, bq), jnp.int32) if segs else None,
                   plgpu.SMEM((stages, bk), jnp.int32) if segs else None,
                   None if plan.table is None else plgpu.SMEM(plan.table.shape[1:], jnp.int32))
        # TMA copies that complete a Q (or raw K) barrier: two halves (+ cos, sin) (+ segment ids)
        loads = 2 + (2 if rope else 0) + (1 if segs else 0)
        barriers = (plgpu.Barrier(num_arrivals=loads, num_barriers=2),
                    plgpu.Barrier(num_arrivals=loads, num_barriers=stages),
                    plgpu.Barrier(num_arrivals=1, num_barriers=stages) if rope else None,
                    plgpu.Barrier(num_arrivals=1, num_barriers=stages),
                    plgpu.Barrier(num_arrivals=2, num_barriers=stages),
                    plgpu.Barrier(num_arrivals=1, num_barriers=2) if pingpong else None,
                    None if plan.table is None else plgpu.Barrier(num_arrivals=1))
        pl.run_scoped(lambda *scr: kernel(q_ref, k_ref, v_ref, cos_ref, sin_ref, seg_ref, rng_ref, win_ref, sched_ref,
                                          o_ref, lse_ref, scr),
                      buffers, barriers, collective_axes="wg")

    f = plgpu.kernel(
        entry,
        out_type=(jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((B, Hq, T), jnp.float32)),
        grid=plan.grid, grid_names=plan.grid_names, num_threads=3, thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=interpret,
    )
    extra = ((cos, sin) if rope else ()) + ((seg, segment_ranges(seg)[0] if ranges is None else ranges) if segs else ())
    extra += (window_array(window),) if windowed else ()
    extra += () if plan.table is None else (jnp.asarray(plan.table),)
    return f(q, k, v, *extra)
