#!/usr/bin/env bash
# Create or reuse .venv with the CPU set-up of every backend; idempotent (a stamp records what is installed).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# torch is the registry's default build (2.14.1, a CUDA build that runs on the CPU: what most users
# get) with the torchvision that works with it, so the tests run on torchvision, timm and transformers
# models and on the mixed-framework process that crashes with that build unless tlcore orders its
# native libraries (see tlcore_torch/_torch.py). The CPU-only wheel 2.13.0 has no working torchvision
# here. peft is the reference for the LoRA tests and benchmarks (tlcore does not need it). pyproject.toml
# keeps honest lower bounds for real users.
REQS="torch==2.14.1 torchvision==0.29.1 timm==1.0.* transformers==5.* peft==0.21.* tensorflow-cpu==2.21.* jax==0.10.* jaxlib==0.10.* flax==0.12.* optax==0.2.*"
stamp=".venv/.tlcore-setup-$(echo "$REQS $(cat pyproject.toml)" | sha1sum | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  .venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip
  .venv/bin/python -m pip install -q --disable-pip-version-check $REQS
  .venv/bin/python -m pip install -q --disable-pip-version-check -e ".[test,demo,bench]"
  rm -f .venv/.tlcore-setup-*; touch "$stamp"
fi
