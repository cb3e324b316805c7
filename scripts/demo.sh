#!/usr/bin/env bash
# Set up (or reuse) .venv, then run the main job: the transfer-learning demo on every installed backend.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/tlcore demo --backend all "$@"
