#!/usr/bin/env bash
# Runs one fer_jax job locally with tcmalloc preloaded when available (1.2-1.6x faster on CPU,
# docs/performance.md#tcmalloc) and a persistent XLA compilation cache.
#   launch/local.sh configs/supervised.py:runlocal /tmp/run [--config.x=y ...]
set -euo pipefail
config="${1:?usage: launch/local.sh CONFIG[:ARGS] WORKDIR [FLAGS...]}"
workdir="${2:?usage: launch/local.sh CONFIG[:ARGS] WORKDIR [FLAGS...]}"
shift 2
cd "$(dirname "$0")/.."
tcmalloc=/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4
if [ -f "$tcmalloc" ]; then
  export LD_PRELOAD="$tcmalloc${LD_PRELOAD:+:$LD_PRELOAD}"
else
  echo "launch/local.sh: $tcmalloc not found: running with glibc malloc, CPU training about" \
       "1.25x slower (apt-get install libtcmalloc-minimal4; docs/performance.md#tcmalloc)" >&2
fi
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-$HOME/.cache/fer_jax_xla}"
exec "${PYTHON:-python}" -m fer_jax.main --config="$config" --workdir="$workdir" "$@"
