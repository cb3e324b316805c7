#!/usr/bin/env bash
# Set up (or reuse) .venv, then run the whole test suite on every installed backend, and the
# docstring examples of the core package.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -n 2 --dist loadgroup --doctest-modules tests tlcore "$@"
