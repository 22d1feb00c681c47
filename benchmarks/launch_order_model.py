"""How much a launch order loses to the tail, by list scheduling (no GPU): 132 SMs, one CTA per SM
(shared memory allows one), each CTA costing its key (query) tiles + 3 for prologue/epilogue, CTAs
taken in launch order by the first free SM. Compares the Mosaic attention kernels' old order (head,
block, batch; Mosaic launches the last grid axis fastest) with longest-first (attention_mosaic.cta_grid),
and the persistent forward's static snake (attention_mosaic.QTiles: tile t of round i to CTA t or its
mirror) by chunks of heads against the same order taken dynamically (first free CTA).

  PYTHONPATH=$PWD python3 benchmarks/launch_order_model.py
"""
from pallas_kernels.attention_mosaic import list_schedule


def makespan(jobs, sms=132, overhead=3):
    """Jobs in order, each to the first free SM (the persistent forward's list schedule does the same)."""
    work = [w + overhead for w in jobs]
    return max(sum(work[t] for t in ts) for ts in list_schedule(work, sms))


def main():
    for T, B in ((2048, 8), (8192, 2)):
        nq = T // 128
        kernels = (("fwd/dq", lambda qi: 2 * (qi + 1), 32),  # 64-key tiles up to the diagonal
                   ("dk/dv", lambda kb: 4 * 2 * (nq - kb), 8))  # 4 query heads x 64-row tiles from the diagonal
        for name, work, heads in kernels:
            old = [work(i) for _ in range(heads) for i in range(nq) for _ in range(B)]
            new = [work(i) for i in sorted(range(nq), key=lambda i: -work(i)) for _ in range(B) for _ in range(heads)]
            ideal = sum(w + 3 for w in old) / 132
            print(f"T={T} B={B} {name:7s} time / ideal: old order {makespan(old) / ideal:.3f}, "
                  f"longest first {makespan(new) / ideal:.3f}")
    persistent()


def snake_makespan(jobs, ctas=132, overhead=0.3):
    """QTiles' static assignment: round i's tiles to CTAs 0..C-1, odd rounds mirrored."""
    load = [0.0] * ctas
    for t, work in enumerate(jobs):
        i, r = divmod(t, ctas)
        load[r if i % 2 == 0 else ctas - 1 - r] += work + overhead
    return max(load)


def chunked_order(B, heads, nq, chunk):
    """Forward tiles' work (64-key tiles) longest first within chunks of `chunk` heads of a batch row
    (chunk None: QTiles' default, longest first across every (batch row, head))."""
    if chunk is None:
        return [2 * (qi + 1) for qi in reversed(range(nq)) for _ in range(B * heads)]
    return [2 * (qi + 1) for _ in range(B) for _ in range(heads // chunk)
            for qi in reversed(range(nq)) for _ in range(chunk)]


def persistent(heads=32, ctas=132):
    # overhead 0.3 steps per tile: the producer streams the next tile's K/V under the last one.
    for T, B in ((2048, 8), (8192, 2), (16384, 1), (32768, 1)):
        row = []
        for chunk in (None, 16, 8):
            jobs = chunked_order(B, heads, T // 128, chunk)
            ideal = sum(w + 0.3 for w in jobs) / ctas
            row.append(f"{'default' if chunk is None else f'heads by {chunk}'}: snake {snake_makespan(jobs, ctas) / ideal:.3f} "
                       f"dynamic {makespan(jobs, ctas, 0.3) / ideal:.3f}")
        print(f"T={T} B={B} persistent fwd time / ideal: " + "; ".join(row))


if __name__ == "__main__":
    main()
