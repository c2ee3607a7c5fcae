#!/usr/bin/env bash
# Regenerates the committed Python modules from proto/*.proto. Run from anywhere.
# The .proto files sit where their path equals the Python package path, so the
# generated imports read `from proto import x_pb2` and need no rewriting.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m grpc_tools.protoc -I . \
  --python_out=. --mypy_out=. --grpc_python_out=. --mypy_grpc_out=. \
  proto/*.proto
