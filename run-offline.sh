#!/usr/bin/env bash
# Run fedsqueeze's default federated simulation with `flwr run .`, offline (see README.md).
set -euo pipefail
cd "$(dirname "$0")"
export FLWR_HOME="${FLWR_HOME:-$PWD/.flwr}"
export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1 FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
export RAY_USAGE_STATS_ENABLED=0
data="${FEDSQUEEZE_DATA:-$PWD/../shared/datasets/mnist.npz}"
[ -e "$data" ] || data=""  # no local copy: let torchvision download it
PATH="$PWD/.venv/bin:$PATH" exec flwr run . \
  --federation-config "num-supernodes=10 client-resources-num-cpus=1" \
  --run-config "data-dir=\"$data\" results-dir=\"$PWD/results\"" --stream "$@"
