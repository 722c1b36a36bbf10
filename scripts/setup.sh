#!/usr/bin/env bash
# Set up .venv for genft on a fresh machine: a torch build that loads here, then genft with its test extras.
# GPU users: install genft into your own environment with your own torch (`pip install -e .`); this script
# only picks a torch when none that imports is present. Override the choice with GENFT_TORCH="torch==X torchvision==Y".
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
if ! .venv/bin/python -c "import torch, torchvision" >/dev/null 2>&1; then
  if [ -n "${GENFT_TORCH:-}" ]; then
    TORCH_SPEC="$GENFT_TORCH"
  elif [ "$(uname -m)" = "aarch64" ]; then
    TORCH_SPEC="torch==2.9.1 torchvision==0.24.1"
  else
    # open_clip needs torchvision; PyPI's torchvision fails beside the CPU-only torch 2.13.0 wheel
    # ("torchvision::nms does not exist"), while this pair loads on CPU-only x86_64 machines.
    TORCH_SPEC="torch==2.14.1 torchvision==0.29.1"
  fi
  echo "setup: installing $TORCH_SPEC"
  # shellcheck disable=SC2086
  .venv/bin/python -m pip install --quiet $TORCH_SPEC
fi
.venv/bin/python -m pip install --quiet -e ".[test]"
echo "setup: done ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
