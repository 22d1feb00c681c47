#!/usr/bin/env python3
"""Where a kernel's warps wait: Nsight Compute's per-instruction stall samples (the source page of a
report collected with `--section SourceCounters --section WarpStateStats`), summarised.

    ncu --clock-control none -k regex:mosaic --launch-skip 1 --launch-count 1 --section SourceCounters \\
        --section WarpStateStats -o $OUT/rep python3 benchmarks/profile_attention.py --T 2048 --B 8 --impl ours-norope
    ncu -i $OUT/rep.ncu-rep --page source --csv --print-source sass > $OUT/source.csv
    python3 benchmarks/ncu_hotspots.py $OUT/source.csv [--top 40]

Prints the sample share per opcode, per stall reason, and the top instructions with the ones just
before them (a wait's cost shows on the instruction after the thing waited for). --feeders: the
samples of each sampled instruction charged to the instruction that last wrote one of its source
registers, summed by (opcode, writer's opcode): e.g. "R2UR <- LDL.64" is a wgmma descriptor
reloaded from a spill (session 18: 15.7% of the fused backward's samples). --regions: the runs
of instructions executed about equally often (each loop body, per-head and per-CTA code) with their
shares; --range LO:HI then summarises one of them (session 19: a consumer's loop of the fused
backward, from benchmarks/profiles/session19_fused_8k_source.csv.gz).
"""
import argparse
import collections
import csv
import gzip
import io
import re
import sys


def tables(text):
    """The CSV tables in text (ncu prints one per kernel, each starting with a header row)."""
    out, cur = [], []
    for row in csv.reader(io.StringIO(text)):
        if row and any("Address" == c or "# Address" == c for c in row[:2]) and cur:
            out.append(cur)
            cur = []
        if row:
            cur.append(row)
    if cur:
        out.append(cur)
    return [t for t in out if len(t) > 1]


def number(s):
    try:
        return float(s.replace(",", ""))
    except ValueError:
        return 0.0


def sampled_source(rows):
    """(the source and total-samples columns' indices, each instruction's samples), or None
    without those columns."""
    low = [h.lower() for h in rows[0]]
    src = next((i for i, h in enumerate(low) if h == "source"), None)
    total = next((i for i, h in enumerate(low) if "sampling (all" in h), None)
    if src is None or total is None:
        return None
    return src, total, [number(r[total]) if len(r) > total else 0.0 for r in rows[1:]]


def summarise(rows, top, context):
    head = rows[0]
    body = rows[1:]
    low = [h.lower() for h in head]
    addr = next((i for i, h in enumerate(low) if "address" in h), 0)
    found = sampled_source(rows)
    if found is None:
        print("columns:", head)
        return
    src, total, samples = found
    # the all-samples column of each reason ("stall_wait"), not its not-issued subset ("stall_wait (not issued)")
    reasons = [i for i, h in enumerate(low) if (h.startswith("stall_") and "not issued" not in h)
               or "pcsamp_warps_issue_stalled" in h
               or (h.startswith("warp stall sampling") and i != total and "not-issued" not in h)]
    all_ = sum(samples) or 1.0
    print(f"{len(body)} instructions, {all_:.0f} samples; columns: {len(head)}")
    by_op = collections.Counter()
    for r, s in zip(body, samples):
        by_op[opcode(r[src])] += s
    print("by opcode:", ", ".join(f"{op} {100 * s / all_:.1f}%" for op, s in by_op.most_common(14)))
    if reasons:
        per = collections.Counter({head[i]: sum(number(r[i]) for r in body if len(r) > i) for i in reasons})
        tot = sum(per.values()) or 1.0
        print("by reason:", ", ".join(f"{k} {100 * v / tot:.1f}%" for k, v in per.most_common(12)))
    order = sorted(range(len(body)), key=lambda i: -samples[i])[:top]
    for i in sorted(order):
        why = ""
        if reasons:
            rs = sorted(((number(body[i][j]), head[j]) for j in reasons if len(body[i]) > j), reverse=True)[:2]
            why = "; ".join(f"{n} {v:.0f}" for v, n in rs if v)
        print(f"{100 * samples[i] / all_:5.1f}%  {body[i][addr]:>6}  {body[i][src].strip()[:70]:70s}  {why}")
        for j in range(max(0, i - context), i):
            print(f"{'':7s}  {body[j][addr]:>6}  {body[j][src].strip()[:70]}")


def print_feeders(rows, n):
    found = sampled_source(rows)
    if found is None:
        return
    src, _, samples = found
    all_ = sum(samples) or 1.0
    pairs = feeders([r[src] for r in rows[1:]], samples)
    print("by (opcode <- writer of its sources):",
          ", ".join(f"{op} <- {w} {100 * v / all_:.1f}%" for (op, w), v in pairs.most_common(n)))


def regions(executed, tolerance=0.2):
    """[start, end) runs of consecutive instructions executed about equally often (within
    `tolerance`; unexecuted ones join the run they sit in): a loop body, a per-head block, the
    per-CTA prologue show up as separate runs."""
    out, start, ref = [], 0, None
    for i, n in enumerate(executed):
        if n and ref and abs(n - ref) > tolerance * max(n, ref):
            out.append((start, i))
            start, ref = i, n
        elif n and not ref:
            ref = n
    if executed:
        out.append((start, len(executed)))
    return out


def print_regions(rows, min_share=0.004):
    """Each run (`regions`) holding at least min_share of the samples: its rows (for --range), how
    often its first executed instruction ran, its share, its first instruction."""
    found = sampled_source(rows)
    low = [h.lower() for h in rows[0]]
    ex = next((i for i, h in enumerate(low) if h == "instructions executed"), None)
    if found is None or ex is None:
        return
    src, _, samples = found
    body = rows[1:]
    all_ = sum(samples) or 1.0
    executed = [number(r[ex]) if len(r) > ex else 0.0 for r in body]
    for lo, hi in regions(executed):
        share = sum(samples[lo:hi]) / all_
        if share >= min_share:
            runs = next((n for n in executed[lo:hi] if n), 0)
            print(f"rows {lo}:{hi}  executed {runs:>10.0f}  {100 * share:5.1f}%  {body[lo][src].strip()[:60]}")


def unpredicated(text):
    return re.sub(r"^@!?U?P\w+\s+", "", text.strip())


def opcode(text):
    return unpredicated(text).split(" ")[0]


def registers(text):
    """(destination registers, source registers) of one SASS instruction: R<n> only; a .64 / .128
    load or a wide move writes 2 / 4 consecutive registers."""
    op, _, args = unpredicated(text).partition(" ")
    regs = [a.strip() for a in args.split(",")]
    if not regs or not re.fullmatch(r"R\d+", regs[0]) or op.startswith(("ST", "HGMMA", "RED", "ATOM", "BAR", "SYNCS")):
        return [], [r for a in regs for r in re.findall(r"\bR\d+\b", a)]
    width = 4 if ".128" in op else 2 if ".64" in op or "WIDE" in op else 1
    first = int(regs[0][1:])
    return [f"R{first + i}" for i in range(width)], [r for a in regs[1:] for r in re.findall(r"\bR\d+\b", a)]


def feeders(instructions, samples, window=400):
    """{(opcode, writer's opcode): samples}: each sampled instruction's samples charged to the
    closest earlier instruction (within `window`, in address order) writing one of its sources."""
    regs = [registers(text) for text in instructions]
    out = collections.Counter()
    for i, (text, n) in enumerate(zip(instructions, samples)):
        if not n:
            continue
        srcs = set(regs[i][1])
        writer = "none"
        for j in range(i - 1, max(-1, i - window), -1):
            if srcs.intersection(regs[j][0]):
                writer = opcode(instructions[j])
                break
        out[(opcode(text), writer)] += n
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("csv", help="the source page as CSV (ncu -i REP --page source --csv --print-source sass), or .csv.gz")
    p.add_argument("--top", type=int, default=30)
    p.add_argument("--context", type=int, default=0, help="instructions shown before each top one")
    p.add_argument("--feeders", type=int, default=0, metavar="N",
                   help="also the N largest (opcode, writer of its sources) sample sums")
    p.add_argument("--regions", action="store_true",
                   help="also the runs of instructions executed about equally often (loops, per-CTA code) and their shares")
    p.add_argument("--range", metavar="LO:HI", help="summarise only instruction rows LO..HI (from --regions)")
    a = p.parse_args()
    opener = gzip.open if a.csv.endswith(".gz") else open  # reports kept in benchmarks/profiles/ are gzipped
    with opener(a.csv, "rt", errors="replace") as fh:
        ts = tables(fh.read())
    if not ts:
        sys.exit(f"ncu_hotspots: no table in {a.csv}")
    for n, t in enumerate(ts):
        print(f"== kernel {n}")
        if a.regions:
            print_regions(t)
        if a.range:
            lo, hi = (int(x) for x in a.range.split(":"))
            t = [t[0]] + t[1 + lo:1 + hi]
        summarise(t, a.top, a.context)
        if a.feeders:
            print_feeders(t, a.feeders)


if __name__ == "__main__":
    main()
