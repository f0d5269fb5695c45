#!/usr/bin/env bash
# scripts/gpu-check.sh OUTDIR [--quick] [--seed N] [--no-baseline] [--profile]
#
# Runs every GPU check in one go on the GPU machine (H100/H200, CUDA 13.0 driver and
# toolkit, no Rust): `cloudrm gpu-check --out OUTDIR --stages X --append` once per stage
# (a: 75 s, b: 60 s and, without --quick, the stage c benchmark: 120 s, each bounded by
# `timeout`), then (without --quick) the PyTorch baseline of stage c,
# scripts/reference/bench_gpu_pytorch.py (100 s), whose table of ratios goes to
# OUTDIR/summary.md. When a check of stage a or b failed, that stage is rerun at quick
# sizes under compute-sanitizer memcheck (75 s, OUTDIR/sanitizer.log). At most 7 minutes
# in all; about 3 when everything passes. --no-baseline skips the PyTorch baseline;
# --profile adds Nsight Compute's per-kernel times of stage (c)'s decode steps (below).
# Run it from the repository root. It
#   - finds the binary: $CLOUDRM_BIN, else ./target/release/cloudrm (built elsewhere and
#     carried: the machine has no Rust toolchain);
#   - finds the CUDA libraries cudarc loads by name (libcuda.so.1, libnvrtc.so.13,
#     libcublas.so.13 + libcublasLt.so.13): via ldconfig, else in the standard install
#     folders (/usr/local/cuda*, /usr/local/nvidia, a Python environment's nvidia/cu13
#     wheels), putting their folders on LD_LIBRARY_PATH and setting CLOUDRM_NVRTC_LIB
#     if it is not set already;
#   - passes stage b the default model's tokenizer files from $CLOUDRM_TOKENIZER_DIR, else
#     ./target/gpu-carry/tokenizer (copy tokenizer.json and tokenizer_config.json there
#     from the folder `cloudrm fetch-model` prints, and carry it): the GPU scorer
#     (`--device cuda`) is then checked against the CPU scorer;
#   - records the date, nvidia-smi and the libraries found in OUTDIR/environment.log;
#   - returns the first non-zero exit status of the stages (124 when a timeout struck).
# gpu-check itself writes OUTDIR/gpu-check.log (human log) and OUTDIR/results.jsonl (one
# JSON object per check, then a summary line); the baseline writes OUTDIR/pytorch.jsonl.
# Safe to rerun: the files are replaced.
set -euo pipefail

usage() {
    echo "usage: $0 OUTDIR [--quick] [--seed N] [--no-baseline] [--profile]" >&2
    exit 2
}

[ "$#" -ge 1 ] || usage
case "$1" in -*) usage ;; esac
out=$1
shift

mkdir -p "$out"
env_log="$out/environment.log"
: >"$env_log"

say() {
    printf '%s\n' "$*" | tee -a "$env_log" >&2
}

bin=${CLOUDRM_BIN:-./target/release/cloudrm}
if [ ! -x "$bin" ]; then
    say "gpu-check.sh: no cloudrm binary at $bin (set CLOUDRM_BIN, or build and carry target/release/cloudrm)"
    exit 2
fi

# First path ldconfig knows for a soname, or nothing.
from_ldconfig() {
    { ldconfig -p 2>/dev/null || true; } | awk -v n="$1" '$1 == n { print $NF; exit }'
}

# First existing file among the standard install locations for a soname.
from_install_dirs() {
    local name=$1 f
    for f in \
        /usr/local/cuda/lib64/"$name" \
        /usr/local/cuda/targets/x86_64-linux/lib/"$name" \
        /usr/local/cuda-13*/lib64/"$name" \
        /usr/local/cuda-13*/targets/x86_64-linux/lib/"$name" \
        /usr/local/cuda*/lib64/"$name" \
        /usr/local/nvidia/lib64/"$name" \
        /usr/local/nvidia/lib/"$name" \
        /usr/lib/x86_64-linux-gnu/"$name" \
        /usr/lib64/"$name" \
        /opt/*/.venv/lib/python3*/site-packages/nvidia/cu13/lib/"$name" \
        /usr/local/lib/python3*/dist-packages/nvidia/cu13/lib/"$name" \
        /usr/lib/python3*/site-packages/nvidia/cu13/lib/"$name"; do
        if [ -e "$f" ]; then
            printf '%s\n' "$f"
            return 0
        fi
    done
    return 0
}

# Make a library loadable by soname: nothing to do when ldconfig has it, else put the
# folder of the first one found on LD_LIBRARY_PATH. Sets `found` to its path (or empty).
found=
locate_lib() {
    local name=$1 dir
    found=$(from_ldconfig "$name")
    if [ -n "$found" ]; then
        say "  $name: $found (ldconfig)"
        return 0
    fi
    found=$(from_install_dirs "$name")
    if [ -n "$found" ]; then
        dir=$(dirname "$found")
        LD_LIBRARY_PATH="$dir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
        export LD_LIBRARY_PATH
        say "  $name: $found (added its folder to LD_LIBRARY_PATH)"
    else
        say "  $name: NOT FOUND"
    fi
}

say "gpu-check.sh: $(date -u '+%Y-%m-%dT%H:%M:%SZ')"
say "repo: $(git rev-parse --short HEAD 2>/dev/null || echo unknown) binary: $bin ($("$bin" --version 2>/dev/null || echo '?'))"
say "host: $(uname -srm)"
if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi 2>&1 | tee -a "$env_log" >&2 || true
    nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total --format=csv 2>&1 |
        tee -a "$env_log" >&2 || true
else
    say "nvidia-smi: not found"
fi

say "libraries:"
locate_lib libcuda.so.1
locate_lib libcublas.so.13
locate_lib libcublasLt.so.13
locate_lib libnvrtc.so.13
if [ -z "${CLOUDRM_NVRTC_LIB:-}" ] && [ -n "$found" ]; then
    CLOUDRM_NVRTC_LIB=$found
    export CLOUDRM_NVRTC_LIB
fi
say "CLOUDRM_NVRTC_LIB=${CLOUDRM_NVRTC_LIB:-}"
say "LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}"

# The PTX cache goes to a scratch folder, not into OUTDIR.
CLOUDRM_HOME=${CLOUDRM_HOME:-${TMPDIR:-/tmp}/cloudrm-gpu-check}
export CLOUDRM_HOME

quick=0
baseline=1
profile=0
pass=()
for a in "$@"; do
    case "$a" in
        --quick) quick=1 pass+=("$a") ;;
        --no-baseline) baseline=0 ;;
        --profile) profile=1 ;;
        *) pass+=("$a") ;;
    esac
done
set -- ${pass[@]+"${pass[@]}"}

# Each stage in its own process, appending to one gpu-check.log / results.jsonl: a
# sticky CUDA error (an illegal address poisons the context) or a hang then costs one
# stage, not the run. The PTX cache (CLOUDRM_HOME) spares the later stages NVRTC.
rm -f "$out/gpu-check.log" "$out/results.jsonl" "$out/sanitizer.log"
rc=0
first_failed=
run_stage() {
    local stage=$1 limit=$2 r
    shift 2
    set +e
    timeout --kill-after=10 "$limit" "$bin" gpu-check --out "$out" --stages "$stage" --append "$@"
    r=$?
    set -e
    if [ "$r" -eq 124 ] || [ "$r" -eq 137 ]; then
        say "gpu-check.sh: stage $stage ran past $limit s and was stopped (exit $r)"
    fi
    say "gpu-check.sh: stage $stage exited with $r at $(date -u '+%Y-%m-%dT%H:%M:%SZ')"
    if [ "$r" -ne 0 ] && [ "$rc" -eq 0 ]; then
        rc=$r
    fi
    if [ "$r" -eq 1 ] && [ -z "$first_failed" ] && [ "$stage" != c ]; then
        first_failed=$stage
    fi
}
# The GPU scorer check of stage b (--device cuda against the CPU scorer) needs the
# default model's tokenizer files, carried beside the binary.
tok=${CLOUDRM_TOKENIZER_DIR:-./target/gpu-carry/tokenizer}
tok_args=()
if [ -f "$tok/tokenizer.json" ] && [ -f "$tok/tokenizer_config.json" ]; then
    tok_args=(--tokenizer "$tok")
else
    say "gpu-check.sh: no tokenizer.json + tokenizer_config.json in $tok: stage b skips the scorer check"
fi
run_stage a 75 "$@"
run_stage b 60 "$@" ${tok_args[@]+"${tok_args[@]}"}
if [ "$quick" -eq 0 ]; then
    run_stage c 120 "$@"
fi

# A failed check of stage a or b: rerun that stage (quick sizes) under compute-sanitizer's
# memcheck, where the machine supports it, for the first bad access it finds.
if [ -n "$first_failed" ] && command -v compute-sanitizer >/dev/null 2>&1; then
    say "gpu-check.sh: stage $first_failed failed; rerunning it under compute-sanitizer (sanitizer.log)"
    set +e
    timeout --kill-after=10 75 compute-sanitizer --tool memcheck --print-limit 30 \
        "$bin" gpu-check --out "${TMPDIR:-/tmp}/cloudrm-gpu-check-sanitizer" \
        --stages "$first_failed" --quick >"$out/sanitizer.log" 2>&1
    say "gpu-check.sh: compute-sanitizer exited with $? at $(date -u '+%Y-%m-%dT%H:%M:%SZ')"
    set -e
fi

# Stage (c)'s baseline: PyTorch + transformers on the same model shape, in the same run
# (not with --quick). It prints the cloudrm / PyTorch table (also in OUTDIR/summary.md);
# its own failure (exit 3: no torch or no CUDA) does not change the exit status.
if [ "$quick" -eq 0 ] && [ "$baseline" -eq 1 ]; then
    py=${PYTHON:-python3}
    set +e
    timeout --kill-after=10 100 "$py" scripts/reference/bench_gpu_pytorch.py \
        --out "$out/pytorch.jsonl" --ours "$out/results.jsonl" >"$out/summary.md"
    prc=$?
    set -e
    cat "$out/summary.md" >&2 || true
    say "gpu-check.sh: PyTorch baseline exited with $prc at $(date -u '+%Y-%m-%dT%H:%M:%SZ')"
fi
# --profile: Nsight Compute's kernel durations in stage (c) of one prefill, 2 single-
# stream decode steps, 2 K-critique steps and (8B shape) one tensor-core prefill
# (cloudrm gpu-check --profile-steps 2 brackets them with cuProfilerStart/Stop; each
# forward starts with its embedding_bf16 launch), one CSV row per kernel in
# OUTDIR/ncu.csv; the program's own output goes to OUTDIR/ncu-app.log.
if [ "$profile" -eq 1 ] && [ "$quick" -eq 0 ]; then
    if command -v ncu >/dev/null 2>&1; then
        set +e
        timeout --kill-after=10 150 ncu --profile-from-start off --clock-control none \
            --metrics gpu__time_duration.sum --csv --page raw --print-units base \
            --log-file "$out/ncu.csv" \
            "$bin" gpu-check --out "${TMPDIR:-/tmp}/cloudrm-gpu-check-ncu" --stages c \
            --profile-steps 2 "$@" >"$out/ncu-app.log" 2>&1
        say "gpu-check.sh: ncu exited with $? at $(date -u '+%Y-%m-%dT%H:%M:%SZ')"
        { printf '\n## Nsight Compute: GPU time per kernel\n\n'; "${PYTHON:-python3}" scripts/ncu_summary.py "$out/ncu.csv"; } >>"$out/summary.md" 2>&1
        set -e
    else
        say "gpu-check.sh: --profile: ncu not found"
    fi
fi
exit "$rc"
