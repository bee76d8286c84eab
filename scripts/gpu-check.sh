#!/usr/bin/env bash
# One command that checks specserve on this machine's GPU and writes DIR/report.json and
# DIR/report.txt (docs/benchmarks.md, "GPU check"):
#   scripts/gpu-check.sh --out DIR          # on a CUDA machine, at most 8 minutes
#   scripts/gpu-check.sh --cpu --out DIR    # the same parts on the CPU, tiny models, under 3 minutes
# Every other option: scripts/gpu-check.sh --help
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="$root/.venv/bin/python"
if [ ! -x "$python" ]; then
    echo "gpu-check: $python not found: run ./setup.sh first" >&2
    exit 2
fi
cd "$root"
exec "$python" -m specserve.cluster.gpu_check "$@"
