#!/usr/bin/env python3
"""Make the tiny RewardBench-Parquet-export fixtures read by tests/eval_formats.rs:
columns `question, response_A (= chosen), response_B (= rejected), subset, id`, written
by pyarrow the way pandas/pyarrow exports are (one file per codec: snappy, pyarrow's
default, and zstd and gzip). Row 2 has a null response_B (a bad row the reader must
report while keeping the others).

Usage:
    python3 scripts/reference/make_eval_parquet.py --out-dir tests/golden
"""

import argparse
import os

import pyarrow as pa
import pyarrow.parquet as pq

ROWS = [
    ("What is 2 + 2?", "4", "5", "math-prm", 30),
    ("Name a primary colour.", "Red.", "Green is a primary paint colour.", "alpacaeval-easy", 31),
    ("Say hi.", "Hi!", None, "alpacaeval-easy", 32),
    ("Translate 'chat' from French.", "Cat.", "Chat.", "llmbar-natural", 33),
]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out-dir", required=True)
    a = ap.parse_args()
    table = pa.table(
        {
            "question": pa.array([r[0] for r in ROWS], pa.string()),
            "response_A": pa.array([r[1] for r in ROWS], pa.string()),
            "response_B": pa.array([r[2] for r in ROWS], pa.string()),
            "subset": pa.array([r[3] for r in ROWS], pa.string()),
            "id": pa.array([r[4] for r in ROWS], pa.int64()),
        }
    )
    for codec in ["snappy", "zstd", "gzip"]:
        path = os.path.join(a.out_dir, f"eval_rewardbench_{codec}.parquet")
        pq.write_table(table, path, compression=codec)
        print(path, os.path.getsize(path))


if __name__ == "__main__":
    main()
