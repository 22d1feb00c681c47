"""How much a launch order loses to the tail, by list scheduling (no GPU): 132 SMs, one CTA per SM
(shared memory allows one), each CTA costing its key (query) tiles + 3 for prologue/epilogue, CTAs
taken in launch order by the first free SM. Compares the Mosaic attention kernels' old order (head,
block, batch; Mosaic launches the last grid axis fastest) with longest-first (attention_mosaic.cta_grid).

  python3 benchmarks/launch_order_model.py
"""
import heapq


def makespan(jobs, sms=132, overhead=3):
    free = [0.0] * sms
    for work in jobs:
        heapq.heappush(free, heapq.heappop(free) + work + overhead)
    return max(free)


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


if __name__ == "__main__":
    main()
