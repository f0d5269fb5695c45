#!/usr/bin/env python3
"""PyTorch + transformers baseline for the GPU benchmark (stage c) of `cloudrm gpu-check`.

Runs on the GPU machine right after our own binary, from scripts/gpu-check.sh, e.g.

    python3 scripts/reference/bench_gpu_pytorch.py \
        --out "$OUTDIR/pytorch.jsonl" --ours "$OUTDIR/results.jsonl"

and prints a Markdown table comparing the two (re-print it later with --summary-only).
The machine has no network, so there is no checkpoint: the model is a Llama-3-8B-shaped
`LlamaForCausalLM` (or the `tiny` config, or any Llama config.json) with RANDOM weights
(seeded normals, std 0.02; norm weights 1), built directly on the device in bf16 with
SDPA attention: constructed under `torch.device(dev)` with bf16 as the default dtype and
transformers' weight init skipped, so no CPU copy and no fp32 copy is ever made.
Throughput does not depend on the weights' values, only on the shapes.

What it measures (timings are wall clock around torch.cuda.synchronize()):
  - prefill: one forward of a batch-1 prompt of --prefill tokens (random ids, seeded),
    use_cache=True and logits for the last position only (logits_to_keep=1, what
    `generate` does for its own prefill); one warm-up run, then the median of 3 timed
    runs. tokens/s = T / seconds.
  - decode: single-stream greedy decode of --decode tokens with `model.generate` from a
    1-token prompt (do_sample=False, min_new_tokens = max_new_tokens = N, EOS ignored);
    one 8-token warm-up generate first. tokens/s = N / seconds.
  - k16: --k critiques of exactly --critique-tokens tokens after one shared prompt of
    --prefix tokens: one `generate(num_return_sequences=K, do_sample=True, top_k=0,
    top_p=1.0, temperature=1.0, min_new_tokens=N, max_new_tokens=N)` call, EOS ignored,
    seeded, after one short warm-up call (K sequences, 16-token prompt, 2 tokens).
    wall_s is the whole timed call (prefill of the K copies included);
    tokens/s = K * N / wall_s.
Also recorded: the weight bytes (sum of parameter bytes) and torch.cuda.max_memory_allocated()
(after construction in the environment record, per bench in each bench record).

Output (--out, JSON lines; the file is replaced at start, then each record is appended
and flushed as soon as it is measured, so a timeout keeps what finished):
  {"engine": "pytorch", "bench": "environment", "config": ..., "device": ..., "torch": ...,
   "transformers": ..., "dtype": "bfloat16", "attn": "sdpa", "weight_bytes": ...,
   "params": ..., "model_config": {...}, "seed": ..., "build_s": ...,
   "max_memory_allocated": ...}
  {"engine": "pytorch", "bench": "prefill", "config": ..., "tokens": 2048, "seconds": ...,
   "tokens_per_s": ..., "runs_s": [...], "logits_to_keep": 1, "device": ..., "torch": ...,
   "transformers": ..., "dtype": "bfloat16", "attn": "sdpa", "max_memory_allocated": ...}
  {... "bench": "decode", "tokens": 128, "seconds": ..., "tokens_per_s": ...}
  {... "bench": "k16", "tokens": K*N, "k": 16, "critique_tokens": 256, "prefix": 2048,
   "wall_s": ..., "seconds": ..., "tokens_per_s": ...}
  {"engine": "pytorch", "bench": <name>, "config": ..., "error": "..."}   a bench that
   raised (<name> "build" when the model could not be built: then nothing else runs)
  {"engine": "pytorch", "bench": "end", "failed": [...], "total_s": ...}
  {"engine": "pytorch", "skipped": "<reason>"}   no torch / transformers / CUDA (exit 3)

Exit status: 0 all benches ran; 1 a bench (or the model build) failed; 2 bad arguments
(a --config that is no built-in name and no readable config.json included); 3 skipped
(torch or transformers not importable, or --device cuda without CUDA).

stdout carries only the Markdown table (after the benches, and on a skip when --ours is
given); progress and errors go to stderr.

Smoke test without a GPU:
    python3 scripts/reference/bench_gpu_pytorch.py --config tiny --device cpu \
        --prefill 32 --decode 8 --k 4 --critique-tokens 8 --prefix 32 --out pt.jsonl

Only the Python standard library, torch and transformers are used; torch and transformers
are imported after the arguments are parsed, so --help and --summary-only need neither.
"""

import argparse
import json
import math
import os
import statistics
import sys
import time

ENGINE = "pytorch"
BENCHES = ("prefill", "decode", "k16")
# cloudrm ops with no PyTorch bench of their own, shown against this PyTorch bench
# (prefill_flash: the tensor-core prefill attention, measured beside the default one).
OURS_EXTRA = {"prefill_flash": "prefill"}

# Llama-3-8B's shape (meta-llama/Meta-Llama-3-8B config.json), and a tiny one for smoke
# tests. Keys are LlamaConfig arguments.
CONFIGS = {
    "llama-3-8b": {
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "vocab_size": 128256,
        "rope_theta": 500000.0,
        "rms_norm_eps": 1e-5,
        "max_position_embeddings": 8192,
        "tie_word_embeddings": False,
    },
    "tiny": {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "vocab_size": 512,
        "rope_theta": 500000.0,
        "rms_norm_eps": 1e-5,
        "max_position_embeddings": 8192,
        "tie_word_embeddings": False,
    },
}

# Standard deviation of the random weights (transformers' initializer_range default).
INIT_STD = 0.02


class Skip(Exception):
    """The baseline cannot run here at all (no torch, no transformers, no CUDA)."""


def log(msg):
    """Progress for humans goes to stderr; stdout is kept for the summary table."""
    print(f"bench_gpu_pytorch: {msg}", file=sys.stderr, flush=True)


class Out:
    """The --out JSON-lines file: replaced at start, every record flushed at once."""

    def __init__(self, path):
        self.f = None
        self.recs = []  # everything written, for the summary table
        if path:
            d = os.path.dirname(path)
            if d:
                os.makedirs(d, exist_ok=True)
            self.f = open(path, "w", encoding="utf-8")

    def write(self, rec):
        self.recs.append(rec)
        line = json.dumps(rec)
        if self.f is not None:
            self.f.write(line + "\n")
            self.f.flush()
            os.fsync(self.f.fileno())
        else:
            print(line, file=sys.stderr, flush=True)

    def close(self):
        if self.f is not None:
            self.f.close()


# ----------------------------------------------------------------------------------------
# Summary table (no torch needed)


def read_jsonl(path):
    """JSON objects of a JSON-lines file; lines that are not JSON objects are skipped.
    A missing or unreadable file reads as empty."""
    recs = []
    if not path:
        return recs
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                line = line.strip()
                if not line:
                    continue
                try:
                    v = json.loads(line)
                except ValueError:
                    continue
                if isinstance(v, dict):
                    recs.append(v)
    except OSError as e:
        log(f"cannot read {path}: {e}")
    return recs


def _num(v):
    """v as a finite float, or None."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    v = float(v)
    return v if math.isfinite(v) else None


def ours_results(path):
    """cloudrm's stage-c results by op: {"prefill": {"tokens_per_s": .., "wall_s": ..,
    "shape": ..}, ...}. Only lines with stage "c", an op in BENCHES (an op such as
    "k16(...)" counts as "k16"), metric tokens/s and a numeric value; the last such line
    of an op wins. Anything else (other stages, summary lines, junk) is ignored."""
    res = {}
    for r in read_jsonl(path):
        if r.get("stage") != "c":
            continue
        op = str(r.get("op", "")).split("(")[0].strip()
        if op not in BENCHES and op not in OURS_EXTRA:
            continue
        if r.get("metric") not in (None, "tokens/s"):
            continue
        tps = _num(r.get("value"))
        if tps is None or r.get("error") is not None:
            continue
        res[op] = {"tokens_per_s": tps, "wall_s": _num(r.get("wall_s")), "shape": r.get("shape")}
    return res


def pytorch_results(recs):
    """This script's results by bench from its records (the last record of a bench
    wins), plus the environment record and the skip reason, if any."""
    res, env, skipped = {}, None, None
    for r in recs:
        if r.get("engine") != ENGINE:
            continue
        if "skipped" in r:
            skipped = r["skipped"]
            continue
        b = r.get("bench")
        if b == "environment":
            env = r
        elif b in BENCHES:
            if r.get("error") is not None:
                res[b] = {"error": str(r["error"])}
            else:
                res[b] = {"tokens_per_s": _num(r.get("tokens_per_s")), "wall_s": _num(r.get("wall_s"))}
    return res, env, skipped


def _fmt(v, digits=1):
    return "-" if v is None else f"{v:,.{digits}f}"


def summary(ours_path, out_path, pt_recs=None):
    """The Markdown comparison table of cloudrm (--ours) against PyTorch (--out, or the
    records pt_recs when given): rows prefill / decode / k16; tokens/s of each, their
    ratio, and for k16 the wall times. A side without a number prints "-"."""
    ours = ours_results(ours_path)
    theirs, env, skipped = pytorch_results(read_jsonl(out_path) if pt_recs is None else pt_recs)
    lines = [
        "| bench | cloudrm tokens/s | PyTorch tokens/s | cloudrm / PyTorch | cloudrm wall s | PyTorch wall s |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for b in BENCHES:
        o = ours.get(b, {})
        t = theirs.get(b, {})
        o_tps, t_tps = o.get("tokens_per_s"), t.get("tokens_per_s")
        ratio = f"{o_tps / t_tps:.2f}x" if o_tps is not None and t_tps else "-"
        t_cell = _fmt(t_tps) if "error" not in t else "error"
        if b == "k16":
            o_wall, t_wall = _fmt(o.get("wall_s"), 3), _fmt(t.get("wall_s"), 3)
        else:
            o_wall = t_wall = "-"
        lines.append(f"| {b} | {_fmt(o_tps)} | {t_cell} | {ratio} | {o_wall} | {t_wall} |")
    for b, pt in OURS_EXTRA.items():
        if b not in ours:
            continue
        o_tps, t_tps = ours[b].get("tokens_per_s"), theirs.get(pt, {}).get("tokens_per_s")
        ratio = f"{o_tps / t_tps:.2f}x" if o_tps is not None and t_tps else "-"
        lines.append(f"| {b} (vs PyTorch {pt}) | {_fmt(o_tps)} | {_fmt(t_tps)} | {ratio} | - | - |")
    notes = []
    if env is not None:
        notes.append(
            f"PyTorch: torch {env.get('torch')}, transformers {env.get('transformers')}, "
            f"{env.get('dtype')}, attn {env.get('attn')}, config {env.get('config')}, "
            f"device {env.get('device')}"
        )
    if skipped is not None:
        notes.append(f"PyTorch baseline skipped: {skipped}")
    for b in BENCHES:
        if "error" in theirs.get(b, {}):
            notes.append(f"PyTorch {b} failed: {theirs[b]['error']}")
        if ours.get(b, {}).get("shape"):
            notes.append(f"cloudrm {b}: {ours[b]['shape']}")
    text = "\n".join(lines)
    if notes:
        text += "\n\n" + "\n".join(f"- {n}" for n in notes)
    return text


# ----------------------------------------------------------------------------------------
# The model


def load_config(name):
    """(label, LlamaConfig kwargs) for a built-in name, a config.json path, or a folder
    holding one."""
    if name in CONFIGS:
        return name, dict(CONFIGS[name])
    path = os.path.join(name, "config.json") if os.path.isdir(name) else name
    if not os.path.isfile(path):
        raise ValueError(f"--config {name!r} is neither a built-in config "
                         f"({', '.join(CONFIGS)}) nor a config.json file")
    try:
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"--config {path}: {e}") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"--config {path}: not a JSON object")
    if cfg.get("model_type", "llama") != "llama":
        log(f"warning: {path} has model_type {cfg.get('model_type')!r}; building a Llama of its shape")
    # Keep only what shapes the model; dtype, architectures, special tokens (EOS is
    # ignored here) etc. are ours to choose.
    drop = {"architectures", "torch_dtype", "dtype", "model_type", "transformers_version",
            "auto_map", "quantization_config", "_name_or_path", "bos_token_id",
            "eos_token_id", "pad_token_id", "attn_implementation", "use_cache"}
    return name, {k: v for k, v in cfg.items() if k not in drop}


def build_model(torch, transformers, kwargs, dev, seed):
    """A LlamaForCausalLM with seeded random bf16 weights, built on `dev` directly."""
    kwargs = dict(kwargs)
    # EOS never stops generation, pad id 0 (generate wants one), no BOS needed.
    kwargs.update(eos_token_id=None, bos_token_id=None, pad_token_id=0, use_cache=True)
    cfg = transformers.LlamaConfig(attn_implementation="sdpa", **kwargs)
    # transformers' no_init_weights (v5: transformers.initialization; v4: modeling_utils)
    # makes torch.nn.init and transformers' init_weights no-ops, so the parameters start
    # as torch.empty on the device and are filled once, below.
    no_init = None
    for mod in ("transformers.initialization", "transformers.modeling_utils"):
        try:
            no_init = getattr(__import__(mod, fromlist=["no_init_weights"]), "no_init_weights")
            break
        except (ImportError, AttributeError):
            pass
    prev_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(dev):
            if no_init is not None:
                with no_init():
                    model = transformers.LlamaForCausalLM(cfg)
            else:  # init runs on the device: slower but still no CPU or fp32 copy
                model = transformers.LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(prev_dtype)
    # Seeded weights: N(0, INIT_STD) for matrices and embeddings, 1 for the RMSNorm
    # weights (vectors). One generator on the device, parameters in registration order.
    gen = torch.Generator(device=dev)
    gen.manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.dim() == 1:
                p.fill_(1.0)
            else:
                p.normal_(0.0, INIT_STD, generator=gen)
    model.eval()
    model.requires_grad_(False)
    gc = model.generation_config
    gc.eos_token_id = None
    gc.bos_token_id = None
    gc.pad_token_id = 0
    return model


# ----------------------------------------------------------------------------------------
# The benchmarks


class Bencher:
    def __init__(self, torch, model, dev, args, base):
        self.torch = torch
        self.model = model
        self.dev = dev
        self.cuda = dev.startswith("cuda")
        self.a = args
        self.base = base  # fields common to every record
        self.vocab = model.config.vocab_size

    def sync(self):
        if self.cuda:
            self.torch.cuda.synchronize(self.dev)

    def timed(self, fn):
        """Seconds of fn(), synchronized on both sides; also returns fn's value."""
        self.sync()
        t = time.perf_counter()
        v = fn()
        self.sync()
        return time.perf_counter() - t, v

    def ids(self, n, salt):
        """n random token ids in [1, vocab) (never the pad id 0), shape (1, n), seeded."""
        g = self.torch.Generator().manual_seed(self.a.seed * 1000003 + salt)
        x = self.torch.randint(1, self.vocab, (1, n), generator=g)
        return x.to(self.dev)

    def reset_peak(self):
        if self.cuda:
            self.torch.cuda.reset_peak_memory_stats(self.dev)

    def peak(self):
        return self.torch.cuda.max_memory_allocated(self.dev) if self.cuda else None

    def generate(self, prompt, n, **kw):
        """model.generate producing exactly n new tokens per sequence (checked)."""
        out = self.model.generate(
            prompt,
            attention_mask=self.torch.ones_like(prompt),
            min_new_tokens=n,
            max_new_tokens=n,
            pad_token_id=0,
            eos_token_id=None,
            use_cache=True,
            **kw,
        )
        got = out.shape[1] - prompt.shape[1]
        if got != n:
            raise RuntimeError(f"generate produced {got} new tokens, wanted {n}")
        return out

    def prefill(self):
        t = self.a.prefill
        x = self.ids(t, 1)
        fwd = lambda: self.model(input_ids=x, use_cache=True, logits_to_keep=1)
        self.timed(fwd)  # warm-up
        runs = [self.timed(fwd)[0] for _ in range(3)]
        s = statistics.median(runs)
        return {"tokens": t, "seconds": s, "tokens_per_s": t / s, "runs_s": runs,
                "logits_to_keep": 1}

    def decode(self):
        n = self.a.decode
        one = self.ids(1, 2)
        self.timed(lambda: self.generate(one, min(8, n), do_sample=False))  # warm-up
        s, _ = self.timed(lambda: self.generate(one, n, do_sample=False))
        return {"tokens": n, "seconds": s, "tokens_per_s": n / s}

    def k16(self):
        k, n, p = self.a.k, self.a.critique_tokens, self.a.prefix
        prompt = self.ids(p, 3)
        # Warm-up: the same call on a short prompt, 2 tokens (batch-K kernels, sampler).
        self.timed(lambda: self.generate(
            prompt[:, :min(p, 16)], min(n, 2), do_sample=True, num_return_sequences=k,
            top_k=0, top_p=1.0, temperature=1.0))
        self.torch.manual_seed(self.a.seed)  # the sampler's generator (CPU and CUDA)
        s, out = self.timed(lambda: self.generate(
            prompt, n, do_sample=True, num_return_sequences=k,
            top_k=0, top_p=1.0, temperature=1.0))
        if out.shape[0] != k:
            raise RuntimeError(f"generate returned {out.shape[0]} sequences, wanted {k}")
        return {"tokens": k * n, "k": k, "critique_tokens": n, "prefix": p,
                "wall_s": s, "seconds": s, "tokens_per_s": k * n / s}


def run_benches(torch, transformers, args, label, kwargs, out):
    """Builds the model (LlamaConfig kwargs), runs the benches; returns the names of the
    ones that failed."""
    dev = args.device
    cuda = dev.startswith("cuda")
    device_name = torch.cuda.get_device_name(dev) if cuda else "cpu"
    common = {"engine": ENGINE, "config": label, "device": device_name,
              "torch": torch.__version__, "transformers": transformers.__version__,
              "dtype": "bfloat16", "attn": "sdpa"}

    torch.manual_seed(args.seed)
    if cuda:
        torch.cuda.reset_peak_memory_stats(dev)
    log(f"building {label} on {device_name} (random bf16 weights, seed {args.seed})")
    t0 = time.perf_counter()
    try:
        model = build_model(torch, transformers, kwargs, dev, args.seed)
        if cuda:
            torch.cuda.synchronize(dev)
    except Exception as e:  # noqa: BLE001 - recorded, then the run stops
        log(f"model build failed: {type(e).__name__}: {e}")
        out.write({"engine": ENGINE, "bench": "build", "config": label,
                   "error": f"{type(e).__name__}: {e}"})
        return ["build"]
    build_s = time.perf_counter() - t0
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    params = sum(p.numel() for p in model.parameters())
    model_config = {k: kwargs[k] for k in sorted(kwargs)}
    out.write({"engine": ENGINE, "bench": "environment", **common, "weight_bytes": weight_bytes,
               "params": params, "model_config": model_config, "seed": args.seed,
               "build_s": build_s,
               "max_memory_allocated": torch.cuda.max_memory_allocated(dev) if cuda else None,
               "python": sys.version.split()[0]})
    log(f"built in {build_s:.2f} s: {params / 1e9:.3f} G params, {weight_bytes / 2**30:.2f} GiB")

    b = Bencher(torch, model, dev, args, common)
    wanted = [x for x in BENCHES if not args.only or x in args.only]
    failed = []
    for name in wanted:
        log(f"{name}: running")
        b.reset_peak()
        try:
            with torch.inference_mode():
                r = getattr(b, name)()
        except Exception as e:  # noqa: BLE001 - one bench's failure must not stop the rest
            failed.append(name)
            msg = f"{type(e).__name__}: {e}"
            log(f"{name}: FAILED {msg}")
            out.write({"engine": ENGINE, "bench": name, "config": label, "error": msg[:2000]})
            if cuda:
                torch.cuda.empty_cache()
            continue
        rec = {"engine": ENGINE, "bench": name, "config": label, **r, **common,
               "max_memory_allocated": b.peak()}
        out.write(rec)
        extra = f", wall {r['wall_s']:.3f} s" if "wall_s" in r else ""
        log(f"{name}: {r['tokens_per_s']:.1f} tokens/s ({r['tokens']} tokens in {r['seconds']:.3f} s{extra})")
    return failed


def import_or_skip(dev):
    """(torch, transformers), or Skip with a one-line reason."""
    try:
        import torch
    except Exception as e:  # noqa: BLE001 - ImportError, or a broken install's OSError
        raise Skip(f"cannot import torch: {type(e).__name__}: {e}") from None
    try:
        import transformers
        transformers.LlamaConfig, transformers.LlamaForCausalLM  # noqa: B018 - lazy import
    except Exception as e:  # noqa: BLE001
        raise Skip(f"cannot import transformers: {type(e).__name__}: {e}") from None
    if dev.startswith("cuda") and not torch.cuda.is_available():
        raise Skip(f"--device {dev} but CUDA is not available to torch {torch.__version__} "
                   f"(torch.version.cuda={torch.version.cuda})")
    return torch, transformers


def parse_args(argv=None):
    ap = argparse.ArgumentParser(
        description="PyTorch + transformers baseline for cloudrm gpu-check stage c "
                    "(random-weight Llama, bf16, SDPA): prefill, decode, K-critique generate.")
    ap.add_argument("--config", default="llama-3-8b",
                    help=f"built-in ({', '.join(CONFIGS)}) or a Hugging Face config.json "
                         "(or its folder); default llama-3-8b")
    ap.add_argument("--device", default="cuda", help="cuda (default), cuda:N, or cpu (smoke tests)")
    ap.add_argument("--prefill", type=int, default=2048, help="prefill prompt tokens (2048)")
    ap.add_argument("--decode", type=int, default=128, help="greedy decode tokens (128)")
    ap.add_argument("--k", type=int, default=16, help="critiques in the k16 bench (16)")
    ap.add_argument("--critique-tokens", type=int, default=256, help="tokens per critique (256)")
    ap.add_argument("--prefix", type=int, default=2048, help="shared prompt tokens of k16 (2048)")
    ap.add_argument("--seed", type=int, default=0, help="weights, prompts and sampling seed (0)")
    ap.add_argument("--out", metavar="FILE", help="JSON-lines results (replaced; records flushed as measured)")
    ap.add_argument("--ours", metavar="FILE", help="cloudrm gpu-check results.jsonl to compare with")
    ap.add_argument("--only", action="append", choices=BENCHES,
                    help="run only this bench (repeatable)")
    ap.add_argument("--summary-only", action="store_true",
                    help="run nothing: print the table from --ours and --out")
    a = ap.parse_args(argv)
    for name in ("prefill", "decode", "k", "critique_tokens", "prefix"):
        if getattr(a, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be at least 1")
    if a.summary_only and not (a.ours or a.out):
        ap.error("--summary-only needs --ours and/or --out")
    return a


def main(argv=None):
    a = parse_args(argv)
    if a.summary_only:
        print(summary(a.ours, a.out))
        return 0

    try:  # a bad --config is a usage error, found before anything is written
        label, kwargs = load_config(a.config)
    except ValueError as e:
        print(f"bench_gpu_pytorch: {e}", file=sys.stderr)
        return 2
    out = Out(a.out)
    try:
        try:
            torch, transformers = import_or_skip(a.device)
        except Skip as e:
            print(f"bench_gpu_pytorch: skipped: {e}", file=sys.stderr, flush=True)
            out.write({"engine": ENGINE, "skipped": str(e)})
            if a.ours:  # cloudrm's numbers alone, PyTorch's column "-"
                print(summary(a.ours, a.out, out.recs), flush=True)
            return 3
        t0 = time.perf_counter()
        failed = run_benches(torch, transformers, a, label, kwargs, out)
        out.write({"engine": ENGINE, "bench": "end", "failed": failed,
                   "total_s": time.perf_counter() - t0})
    finally:
        out.close()
    print(summary(a.ours, a.out, out.recs), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
