#!/usr/bin/env bash
# Set up .venv for genft on a fresh machine: a torch build that loads here, then genft with its test extras.
# GPU users: install genft into your own environment with your own torch (`pip install -e .`); this script
# only picks a torch when none that imports is present. Override the choice with GENFT_TORCH="torch==X torchvision==Y".
# --with-browser also installs Debian's `chromium` (apt-get, as root or via sudo) for tests/test_browser_gallery.py,
# which is skipped without it.
set -euo pipefail
cd "$(dirname "$0")/.."
WITH_BROWSER=0
for arg in "$@"; do
  case "$arg" in
    --with-browser) WITH_BROWSER=1 ;;
    -h|--help) echo "usage: bash scripts/setup.sh [--with-browser]"; exit 0 ;;
    *) echo "setup: unknown option '$arg' (valid: --with-browser)" >&2; exit 2 ;;
  esac
done
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
# DS_BUILD_OPS=0: DeepSpeed (a test extra) compiles none of its CUDA ops at install; the one op its CPU
# backend needs is built on first use.
DS_BUILD_OPS=0 .venv/bin/python -m pip install --quiet -e ".[test]"
if [ "$WITH_BROWSER" = 1 ]; then
  # Never fatal: without chromium the browser test is skipped with a message, the rest of the suite runs.
  NO_BROWSER="the gallery browser test will be skipped; install Chromium as /usr/bin/chromium to run it"
  if [ -x /usr/bin/chromium ]; then
    echo "setup: chromium already installed ($(/usr/bin/chromium --version 2>/dev/null || echo unknown version))"
  elif ! command -v apt-get >/dev/null 2>&1; then
    echo "setup: --with-browser installs Debian's chromium with apt-get, which this system lacks; $NO_BROWSER" >&2
  else
    SUDO=""
    if [ "$(id -u)" != 0 ]; then
      if command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else
        echo "setup: installing chromium needs root (run 'apt-get install -y chromium' as root); $NO_BROWSER" >&2
        SUDO="skip"
      fi
    fi
    if [ "$SUDO" != skip ]; then
      echo "setup: installing chromium with apt-get"
      $SUDO apt-get update -qq && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null \
        || echo "setup: 'apt-get install chromium' failed (on Ubuntu Chromium is a snap: 'snap install chromium'); $NO_BROWSER" >&2
    fi
  fi
fi
echo "setup: done ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
