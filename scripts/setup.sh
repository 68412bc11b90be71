#!/usr/bin/env bash
# Sets up everything earmark needs on a fresh Debian/Ubuntu machine: system packages,
# a virtual environment in .venv, torch (CPU wheel first), earmark itself with its dev tools.
# Idempotent: a second run only checks. Usage: scripts/setup.sh [--test]  (--test: also chromium)
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v espeak-ng >/dev/null || need_apt+=(espeak-ng)
command -v sox >/dev/null || need_apt+=(sox)
# the tests drive Debian's chromium (the review page) through Playwright
if [ "${1:-}" = "--test" ]; then [ -x /usr/bin/chromium ] || need_apt+=(chromium); fi
if [ ${#need_apt[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
    echo "setup: installing Debian packages: ${need_apt[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -c 'import sys; assert sys.version_info >= (3, 11), "earmark needs Python >= 3.11"'
    "$PY" -m venv .venv
fi
stamp=.venv/.earmark-setup
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ infra/image/requirements.lock -nt "$stamp" ]; then
    .venv/bin/pip install -q --upgrade pip
    # torch before NeMo: where a CPU wheel lies on disk (pip's configured find-links or
    # constraints), this takes it; otherwise pip would resolve a multi-GB CUDA build for NeMo.
    .venv/bin/python -c 'import torch' 2>/dev/null || .venv/bin/pip install -q "torch==2.13.0"
    # setuptools notes on every editable install of a flat layout (earmark's packages sit at the
    # top of the checkout) that folders named like them take precedence: true, and by design here
    # the versions are the image's (infra/image/requirements.lock, written from a tested venv by
    # infra/image/lock.py), so that a new machine tests what the cluster runs
    PYTHONWARNINGS="ignore:Editable installation" .venv/bin/pip install -q -e ".[dev]" -c infra/image/requirements.lock
    touch "$stamp"
fi
# checkov (policy checks of infra/, tests only) pins libraries older than earmark's: a venv of its own
if [ "${1:-}" = "--test" ] && [ ! -x .venv/checkov/bin/checkov ]; then
    .venv/bin/python -m venv .venv/checkov
    .venv/checkov/bin/pip install -q "checkov==3.3.30"
fi
echo "setup: ok ($(.venv/bin/python --version), $(.venv/bin/earmark --version 2>/dev/null || echo 'earmark installed'))"
