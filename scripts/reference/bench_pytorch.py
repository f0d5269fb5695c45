"""PyTorch + transformers baseline for `cloudrm bench` on the same machine and model.

Measures, with the thread count given (default 2), in the dtype given (bf16 or f32):
  - prefill: one forward over 512 tokens (best of 3), tokens/s;
  - decode: 128 greedy tokens from a one-token context (like llama-bench tg128), tok/s;
  - the K-critique job: `generate` with num_return_sequences=K, 128 sampled tokens each
    (EOS suppressed so every sequence has exactly 128), after a 512-token prompt: wall
    time of the whole job and aggregate decode tokens/s.

usage: python bench_pytorch.py MODEL_DIR [--dtype bf16|f32] [--threads 2] [--k 8]
MODEL_DIR is a Hugging Face layout directory (e.g. `cloudrm fetch-model`'s output).
"""
import argparse
import json
import time

import torch
from transformers import AutoModelForCausalLM


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "f32"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--decode", type=int, default=128)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float32
    m = AutoModelForCausalLM.from_pretrained(a.model, dtype=dtype)
    m.eval()
    vocab = m.config.vocab_size
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(100, vocab - 100, (1, a.prefill), generator=g)
    out = {"torch": torch.__version__, "dtype": a.dtype, "threads": a.threads}
    with torch.inference_mode():
        m(prompt[:, :8])  # warm-up
        best = float("inf")
        for _ in range(3):
            t = time.perf_counter()
            m(prompt)
            best = min(best, time.perf_counter() - t)
        out["prefill_tokens_per_s"] = a.prefill / best
        one = prompt[:, :1]
        t = time.perf_counter()
        m.generate(one, max_new_tokens=a.decode, min_new_tokens=a.decode, do_sample=False,
                   pad_token_id=0)
        out["decode_tokens_per_s"] = a.decode / (time.perf_counter() - t)
        t = time.perf_counter()
        m.generate(prompt, max_new_tokens=a.decode, min_new_tokens=a.decode, do_sample=True,
                   temperature=0.5, num_return_sequences=a.k, pad_token_id=0)
        dt = time.perf_counter() - t
        out[f"k{a.k}_job_s"] = dt
        out[f"k{a.k}_aggregate_tokens_per_s"] = a.k * a.decode / dt
    print(json.dumps(out))


if __name__ == "__main__":
    main()
