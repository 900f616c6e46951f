#!/usr/bin/env bash
# Set up the environment and run the quickstart sweep (MiniLM on SST-2, five methods) on a
# local Ray instance, with results in ./peftlab-runs/ (SQLite store, SQLite MLflow).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
if [ -z "${PEFTLAB_DATA_DIR:-}" ] && [ -d ../shared/datasets ]; then
  export PEFTLAB_DATA_DIR=$(cd ../shared/datasets && pwd)
fi
exec .venv/bin/peftlab run examples/quickstart.yaml "$@"
