#!/usr/bin/env bash
# Installs what the tests need, then runs the CPU test suite (GPU-marked tests skip themselves).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
python3 -m pytest -q -m "not gpu" tests "$@"
