#!/usr/bin/env python3
"""Check cloudrm's GGUF import against transformers' own GGUF loader (its dequantisation
and Q/K un-permutation): every parameter of our f32 import must equal transformers'
tensor. Also checks that the import loads in transformers unchanged.

Usage:
    python3 scripts/reference/check_import.py --import-dir <f32 import dir> \
        --gguf <SmolLM2-135M-Instruct.Q4_1.gguf>
Exits non-zero if any tensor differs by more than 1e-6.
"""

import argparse
import os
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--import-dir", required=True)
    ap.add_argument("--gguf", required=True)
    a = ap.parse_args()
    ours = AutoModelForCausalLM.from_pretrained(a.import_dir, dtype=torch.float32)
    theirs = AutoModelForCausalLM.from_pretrained(
        os.path.dirname(os.path.abspath(a.gguf)), gguf_file=os.path.basename(a.gguf),
        dtype=torch.float32)
    sd_ours, sd_theirs = ours.state_dict(), theirs.state_dict()
    if set(sd_ours) != set(sd_theirs):
        print("parameter names differ:", sorted(set(sd_ours) ^ set(sd_theirs)))
        sys.exit(1)
    worst = 0.0
    for name in sorted(sd_ours):
        d = (sd_ours[name] - sd_theirs[name]).abs().max().item()
        worst = max(worst, d)
        if d > 1e-6:
            print(f"{name}: max abs diff {d:e}")
    print(f"{len(sd_ours)} tensors, overall max abs diff {worst:e}")
    tok = AutoTokenizer.from_pretrained(a.import_dir)
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = ours.generate(**ids, max_new_tokens=12, do_sample=False)
    print("transformers on our import:", repr(tok.decode(out[0, ids["input_ids"].shape[1]:])))
    sys.exit(0 if worst <= 1e-6 else 1)


if __name__ == "__main__":
    main()
