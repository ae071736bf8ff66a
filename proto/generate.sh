#!/usr/bin/env bash
# Regenerate the Python code for the .proto files (needs `pip install -e '.[dev]'`).
# protoc writes top-level imports ("import session_pb2"); rewrite them to the package.
# dra_v1.proto and pluginregistration_v1.proto are the kubelet's, vendored (see their headers).
set -euo pipefail
cd "$(dirname "$0")"
python -m grpc_tools.protoc -I. --python_out=. --pyi_out=. --grpc_python_out=. session.proto \
    scheduler.proto dra_v1.proto pluginregistration_v1.proto
rm -f session_pb2_grpc.py   # session frames use a generic handler (see harp/wire.py)
MODULES="session_pb2|scheduler_pb2|dra_v1_pb2|pluginregistration_v1_pb2"
sed -i -E "s/^import ($MODULES) as/from harp.proto import \1 as/" ./*_pb2.py ./*_pb2_grpc.py ./*.pyi
sed -i -E "s/^import ($MODULES)\$/from harp.proto import \1/" ./*.pyi
