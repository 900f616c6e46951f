#!/usr/bin/env bash
# Set up the environment and run the whole test suite (offline, CPU only).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
if [ -z "${PEFTLAB_DATA_DIR:-}" ] && [ -d ../shared/datasets ]; then
  export PEFTLAB_DATA_DIR=$(cd ../shared/datasets && pwd)
fi
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/python -m pytest "$@"
