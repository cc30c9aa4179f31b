#!/usr/bin/env bash
# Run fedsqueeze's default federated simulation with `flwr run .`, offline (see README.md).
set -euo pipefail
cd "$(dirname "$0")"
export FLWR_HOME="${FLWR_HOME:-$PWD/.flwr}"
export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1 FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
export RAY_USAGE_STATS_ENABLED=0
data="${FEDSQUEEZE_DATA:-$PWD/../shared/datasets/mnist.npz}"
[ -e "$data" ] || data=""  # no local copy: let torchvision download it

# `flwr run` starts a detached local SuperLink and leaves it running. Its command line names a log file
# under this FLWR_HOME, which tells it apart from any other SuperLink on the host: if this script started
# it, stop that one process (by its PID) when the run ends. FEDSQUEEZE_KEEP_SUPERLINK=1 leaves it running.
local_superlink_pids() {
  pgrep -f -- "flower-superlink .*--log-file $FLWR_HOME/local-superlink/superlink.log" || true
}
running_before="$(local_superlink_pids)"
status=0
PATH="$PWD/.venv/bin:$PATH" flwr run . \
  --federation-config "num-supernodes=10 client-resources-num-cpus=1" \
  --run-config "data-dir=\"$data\" results-dir=\"$PWD/results\"" --stream "$@" || status=$?
if [ -z "$running_before" ] && [ -z "${FEDSQUEEZE_KEEP_SUPERLINK:-}" ]; then
  for pid in $(local_superlink_pids); do kill "$pid" 2>/dev/null || true; done
fi
exit "$status"
