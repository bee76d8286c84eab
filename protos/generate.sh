#!/usr/bin/env bash
# Regenerates the Python stubs next to each .proto (the .proto files are the source of truth).
set -euo pipefail
cd "$(dirname "$0")"
python=${PYTHON:-../.venv/bin/python}
for proto in $(find specserve -name '*.proto' | sort); do
  "$python" -m grpc_tools.protoc -I . --python_out=. --grpc_python_out=. "$proto"
done
