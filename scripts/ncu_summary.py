#!/usr/bin/env python3
"""Per-kernel GPU time of the forwards profiled by `scripts/gpu-check.sh --profile`.

usage: scripts/ncu_summary.py NCU_CSV [--top N]

Reads the CSV that `ncu --csv --page raw --metrics gpu__time_duration.sum` wrote (one
row per kernel launch, in launch order), splits it into forwards at each
`embedding_bf16` launch (every forward starts with one), and names the sections by what
`cloudrm gpu-check --profile-steps 2` profiles in turn: one prefill, two single-stream
decode steps, two K-critique steps, then one prefill with the tensor-core attention
(where the model's shape has it). Prints a Markdown table per section: the kernels
grouped by name and grid, total and mean time, sorted by total. Standard library only.
"""

import argparse
import collections
import csv
import sys

SECTIONS = {
    5: ["prefill", "decode step", "decode step", "k16 step", "k16 step"],
    6: ["prefill", "decode step", "decode step", "k16 step", "k16 step", "prefill (flash)"],
}


def read(path):
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    head = next((i for i, r in enumerate(rows) if r and r[0] == "ID"), None)
    if head is None:
        raise SystemExit(f"{path}: no ncu CSV header (a row starting with \"ID\")")
    h = rows[head]
    try:
        name, grid, block = h.index("Kernel Name"), h.index("Grid Size"), h.index("Block Size")
        t = h.index("gpu__time_duration.sum")
    except ValueError as e:
        raise SystemExit(f"{path}: missing column: {e}")
    out = []
    for r in rows[head + 1:]:
        if len(r) != len(h) or not r[0].isdigit():
            continue  # units row, warnings
        try:
            ns = float(r[t].replace(",", ""))
        except ValueError:
            continue
        out.append((r[name], r[grid], r[block], ns))
    return out


def split(launches):
    """Forwards: a new one at each embedding launch."""
    parts = []
    for k in launches:
        if k[0].startswith("embedding_bf16") or not parts:
            parts.append([])
        parts[-1].append(k)
    return parts


def table(part, top):
    agg = collections.OrderedDict()
    for name, grid, block, ns in part:
        key = (name.split("(")[0][:64], grid, block)
        a = agg.setdefault(key, [0, 0.0])
        a[0] += 1
        a[1] += ns
    total = sum(ns for *_, ns in part)
    lines = [
        f"{len(part)} launches, {total / 1e3:.1f} us",
        "",
        "| kernel | grid | block | launches | total us | mean us | share |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for (name, grid, block), (n, ns) in sorted(agg.items(), key=lambda x: -x[1][1])[:top]:
        lines.append(
            f"| {name} | {grid} | {block} | {n} | {ns / 1e3:.1f} | {ns / n / 1e3:.2f} "
            f"| {100 * ns / total:.1f} % |"
        )
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("csv")
    ap.add_argument("--top", type=int, default=14)
    a = ap.parse_args(argv)
    parts = split(read(a.csv))
    if not parts:
        print(f"{a.csv}: no kernels")
        return 1
    for i, p in enumerate(parts):
        names = SECTIONS.get(len(parts))
        label = names[i] if names else f"forward {i + 1}"
        print(f"### {label} ({i + 1} of {len(parts)})\n")
        print(table(p, a.top))
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
