#!/usr/bin/env bash
# Regenerates the committed Python modules from proto/*.proto. Run from anywhere.
# protoc reads them through the pacsmesh/proto symlink, so the generated imports read
# `from pacsmesh.proto import x_pb2` (the installed package's name) with no rewriting.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m grpc_tools.protoc -I . \
  --python_out=. --mypy_out=. --grpc_python_out=. --mypy_grpc_out=. \
  pacsmesh/proto/*.proto
