#!/usr/bin/env python3
"""Where a kernel spills: the local-memory loads / stores (LDL / STL) of SASS dumps, and which loop
(the address range of a backward branch) each sits in, innermost first.

    MOSAIC_GPU_DUMP_SASS=1 MOSAIC_GPU_DUMP_TO=$OUT/sass python3 benchmarks/bench_mosaic_bwd.py \\
        --kernel dkv --no-rope --no-baseline --kwargs '[{}]'
    python3 benchmarks/sass_spills.py $OUT/sass [--context 6]

Prints, per dump file with any SASS in it: the number of LDL / STL, then per loop (start, end,
instructions, spills inside) the loops holding spills, and a few spill sites with the instructions
around them. A spill inside the innermost loop of a kernel costs every iteration; one outside runs
once per tile.
"""
import argparse
import os
import re
import sys

INSTR = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
LABEL = re.compile(r"^\s*(\.L_x_\d+):")
BRANCH = re.compile(r"\bBRA\b[^`0-9]*(?:`\((\.L_x_\d+)\)|(0x[0-9a-f]+))")


def parse(text):
    """([(address, instruction text)] of the SASS lines in text, {label: address})."""
    instrs, labels, pending = [], {}, []
    for line in text.splitlines():
        m = LABEL.match(line)
        if m:
            pending.append(m.group(1))
            continue
        m = INSTR.search(line)
        if m:
            addr = int(m.group(1), 16)
            labels.update((name, addr) for name in pending)
            pending = []
            instrs.append((addr, m.group(2)))
    return instrs, labels


def loops(instrs, labels):
    """[(start, end)] address ranges closed by a backward branch, innermost (shortest) first."""
    found = set()
    for addr, ins in instrs:
        m = BRANCH.search(ins)
        if m:
            target = labels.get(m.group(1)) if m.group(1) else int(m.group(2), 16)
            if target is not None and target < addr:
                found.add((target, addr))
    return sorted(found, key=lambda r: r[1] - r[0])


def spill_kind(ins):
    """"LDL" / "STL" for a local-memory load / store, else None."""
    m = re.search(r"\b(LDL|STL)\b", ins)
    return m.group(1) if m else None


def report(path, instrs, labels, context):
    spills = [(i, a, ins) for i, (a, ins) in enumerate(instrs) if spill_kind(ins)]
    n_ld = sum(spill_kind(ins) == "LDL" for _, _, ins in spills)
    print(f"{path}: {len(instrs)} instructions, {len(spills)} spill instructions ({n_ld} LDL, {len(spills) - n_ld} STL)")
    ranges = loops(instrs, labels)
    for lo, hi in ranges:
        inside = [a for _, a, _ in spills if lo <= a <= hi]
        if inside:
            size = sum(lo <= a <= hi for a, _ in instrs)
            print(f"  loop {lo:#06x}-{hi:#06x}: {size} instructions, {len(inside)} spills")
    for i, a, _ in spills[:8]:
        innermost = next(((lo, hi) for lo, hi in ranges if lo <= a <= hi), None)
        where = f"in loop {innermost[0]:#06x}-{innermost[1]:#06x}" if innermost else "outside loops"
        print(f"  -- {a:#06x} ({where})")
        for a2, ins2 in instrs[max(0, i - context):i + context + 1]:
            print(f"     {a2:#06x}  {ins2}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dump_dir")
    p.add_argument("--context", type=int, default=4, help="instructions shown before and after a spill")
    a = p.parse_args()
    seen = 0
    for root, _, files in os.walk(a.dump_dir):
        for name in sorted(files):
            path = os.path.join(root, name)
            try:
                text = open(path, errors="replace").read()
            except OSError:
                continue
            instrs, labels = parse(text)
            if instrs:
                seen += 1
                report(path, instrs, labels, a.context)
    if not seen:
        sys.exit(f"sass_spills: no SASS found under {a.dump_dir} (was MOSAIC_GPU_DUMP_SASS=1 set?)")


if __name__ == "__main__":
    main()
