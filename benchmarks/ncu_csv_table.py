#!/usr/bin/env python3
"""One line per profiled kernel launch from `ncu --csv --metrics ...` output: ID, name, each metric.

    python3 benchmarks/ncu_csv_table.py l2.csv
"""
import csv
import sys


def main(path):
    rows = list(csv.reader(open(path)))
    start = next((i for i, r in enumerate(rows) if r and r[0] == "ID"), None)
    if start is None:
        print(f"{path}: no ncu table (did the profiled run fail? see its .err)")
        return
    head = rows[start]
    name, metric, unit, value = (head.index(c) for c in ("Kernel Name", "Metric Name", "Metric Unit", "Metric Value"))
    launches = {}
    for r in rows[start + 1:]:
        if len(r) > value:
            launches.setdefault((int(r[0]), r[name][:44]), []).append(f"{r[metric].split('__')[-1][:24]}={r[value]}{r[unit]}")
    for (i, kernel), metrics in sorted(launches.items()):
        print(i, f"{kernel:44s}", " ".join(metrics))


if __name__ == "__main__":
    main(sys.argv[1])
