#!/usr/bin/env python3
"""Kernel-only durations (Nsight Compute's gpu__time_duration) of NF4 kernel configs and of the
bf16 matmul, for comparisons that the machine's run-to-run noise in wall-clock timings hides.

One `ncu` process per (shape, direction) runs every config (`profile_nf4.py --calls 3`); the
second call of each is kept, with the kernels after its NF4 kernel (a split's partial-sum pass).
Prints one line per config, sorted, with the ratio to bf16.

    PYTHONPATH=$PWD python3 benchmarks/ncu_kernel_times.py --shapes 14336x4096,1024x4096 \\
        --fwd '[128,2,4,3,0,"prmt16"]' --dx '[16,8,4,3,0,"prmt16"]'

`--breakdown` instead lists every kernel of one call of the default path (NF4 kernel, split-K sum,
any casts XLA adds) and of the bf16 matmul, with their sum: how much of a wall-clock op time the
kernels explain and how much is launch gaps.
"""
import argparse
import csv
import io
import json
import os
import shutil
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def ncu_path():
    found = shutil.which("ncu")
    if found:
        return found
    import glob
    hits = sorted(glob.glob("/opt/nvidia/nsight-compute/*/ncu"))
    return hits[-1] if hits else "ncu"


def kernel_times(args, kernel_regex, script="profile_nf4.py"):
    """[(kernel name, microseconds)] of the launches matching kernel_regex, in launch order."""
    cmd = [ncu_path(), "--clock-control", "none", "-k", f"regex:{kernel_regex}", "--metrics",
           "gpu__time_duration.sum", "--csv", sys.executable, os.path.join(HERE, script), *args]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600).stdout
    rows = [r for r in csv.reader(io.StringIO(out[out.find('"ID"'):]))]
    if not rows:
        return []
    head = rows[0]
    name_i, unit_i, val_i = head.index("Kernel Name"), head.index("Metric Unit"), head.index("Metric Value")
    scale = {"nsecond": 1e-3, "ns": 1e-3, "usecond": 1.0, "us": 1.0, "msecond": 1e3, "ms": 1e3}  # ncu prints "ns" here
    return [(r[name_i], float(r[val_i].replace(",", "")) * scale.get(r[unit_i], 1.0)) for r in rows[1:] if len(r) > val_i]


def one_call(launches, calls):
    """The launches of the last of `calls` identical calls: the shortest trailing run of kernel
    names that the `calls - 1` runs before it repeat (earlier launches are set-up)."""
    names = [n for n, _ in launches]
    for p in range(1, len(names) // calls + 1):
        if all(names[len(names) - p * (c + 1):len(names) - p * c] == names[-p:] for c in range(calls)):
            return launches[-p:]
    return launches


def per_call(launches):
    """Microseconds per NF4 call: each nf4 kernel plus the kernels after it up to the next one
    (a split's partial-sum pass, casts). Launches before the first nf4 kernel are set-up."""
    calls = []
    for name, t in launches:
        if "nf4" in name:
            calls.append(t)
        elif calls:
            calls[-1] += t
    return calls


def nf4_table(shapes, m, calls=3):
    """Kernel time per call (all kernels of it) of the default NF4 path and of the bf16 matmul, per
    (shape, direction), from one process (`profile_nf4.py --table`, ops between ncu_marker kernels)."""
    launches = kernel_times(["--table", ",".join(shapes), "--m", str(m), "--calls", str(calls)], ".")
    segments, cur = [], None
    for name, t in launches:
        if "ncu_marker" in name:
            if cur is not None:
                segments.append(cur)
            cur = []
        elif cur is not None:
            cur.append((name, t))
    rows = [(shape, d) for shape in shapes for d in ("fwd", "dx")]
    print(f"M = {m}: kernel time per call (us), NF4 default path vs bf16 matmul (>1: NF4 faster)")
    for i, (shape, d) in enumerate(rows):
        if 2 * i + 1 >= len(segments):
            print(f"{shape:>11} {d:3s} missing ({len(segments)} segments)")
            continue
        nf4, bf16 = (sum(t for _, t in seg) / calls for seg in segments[2 * i:2 * i + 2])
        names = lambda seg: ", ".join(sorted({n[:28] for n, _ in seg}))  # noqa: E731
        print(f"{shape:>11} {d:3s} nf4 {nf4:7.2f}  bf16 {bf16:7.2f}  {bf16 / nf4:5.2f}x   "
              f"[{names(segments[2 * i])}] [{names(segments[2 * i + 1])}]", flush=True)


def print_breakdown(label, script, args, calls=3):
    ks = one_call(kernel_times([*args, "--calls", str(calls)], ".", script), calls)
    print(f"{label} {sum(t for _, t in ks):8.2f} us in {len(ks)} kernels: "
          + ", ".join(f"{n[:48]} {t:.2f}" for n, t in ks), flush=True)


def breakdown(shapes, m):
    for shape in shapes:
        for direction in ("fwd", "dx"):
            for label, extra in (("nf4", []), ("bf16", ["--bf16"])):
                print_breakdown(f"{shape:>11} {direction:3s} M={m} {label:4s}", "profile_nf4.py",
                                ["--m", str(m), "--shape", shape, "--dir", direction, *extra])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="14336x4096,4096x14336,4096x4096,1024x4096")
    p.add_argument("--m", type=int, default=1)
    p.add_argument("--fwd", action="append", default=[], help="config JSON list (repeatable)")
    p.add_argument("--dx", action="append", default=[], help="config JSON list (repeatable)")
    p.add_argument("--breakdown", action="store_true", help="every kernel of one call of the default path")
    p.add_argument("--attention", metavar="TxB", help="instead: every kernel of one attention fwd+bwd call, per "
                                                      "profile_attention.py impl, at T tokens x B rows")
    p.add_argument("--impls", default="ours,ours-norope,cudnn-rope,cudnn", help="with --attention")
    p.add_argument("--no-bf16", action="store_true", help="configs only: no bf16 line (its process autotunes "
                                                         "XLA's GEMM under ncu, minutes at the large shapes)")
    p.add_argument("--table", action="store_true", help="the default NF4 path against bf16 for all --shapes at --m")
    a = p.parse_args()
    if a.table:
        return nf4_table(a.shapes.split(","), a.m)
    if a.attention:
        t, b = a.attention.split("x")
        for impl in a.impls.split(","):
            print_breakdown(f"attention T={t} B={b} {impl:12s}", "profile_attention.py",
                            ["--T", t, "--B", b, "--impl", impl])
        return None
    if a.breakdown:
        return breakdown(a.shapes.split(","), a.m)
    for shape in a.shapes.split(","):
        for direction, cfgs in (("fwd", a.fwd), ("dx", a.dx)):
            if not cfgs:
                continue
            common = ["--m", str(a.m), "--shape", shape, "--dir", direction, "--calls", "3"]
            bf16 = [] if a.no_bf16 else one_call(kernel_times(common + ["--bf16"], "."), 3)  # at M = 1: XLA's own fusion
            t_bf16 = sum(t for _, t in bf16) if bf16 else float("nan")
            calls = per_call(kernel_times(common + sum((["--cfg", c] for c in cfgs), []), "."))
            # the middle of each config's three calls: it also holds any set-up kernel of the next call
            per_cfg = [calls[3 * i + 1] if 3 * i + 1 < len(calls) else float("nan") for i in range(len(cfgs))]
            print(f"{shape:>11} {direction:3s} bf16 {t_bf16:7.2f} us ({', '.join(n[:40] for n, _ in bf16) or '-'})", flush=True)
            for c, t in sorted(zip(cfgs, per_cfg), key=lambda z: z[1]):
                print(f"{'':>15} {t:7.2f} us  {t_bf16 / t:5.2f}x bf16  {c}", flush=True)


if __name__ == "__main__":
    main()
