#!/usr/bin/env bash
# Sets up a fresh machine for development: a virtualenv in .venv with comfyd and its test extras.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/pip install --quiet --upgrade pip
.venv/bin/pip install --quiet -e '.[test]'
echo "ready: .venv/bin/comfyd, tests: .venv/bin/pytest"
