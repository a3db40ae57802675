#!/usr/bin/env bash
# Install dmr and everything it needs, start the daemon, put a model in the store and answer
# a prompt. Works offline: when no registry can be reached it packages a small generated
# GGUF instead of pulling ai/smollm2.
set -euo pipefail
cd "$(dirname "$0")/.."

python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q -e .  # builds llama-cpp-python, the embedded engine (~8 min once)
export PATH="$PWD/.venv/bin:$PATH"

dmr start-runner || true  # already running is fine

model=ai/smollm2:135M-Q4_0
if ! dmr pull "$model"; then
  echo "No registry reachable: packaging a small generated model as ai/tiny instead." >&2
  gguf="$(mktemp -d)/tiny.gguf"
  .venv/bin/python -c "import sys; sys.path.insert(0, '.'); from pathlib import Path; \
from tests.helpers.gguf_factory import make_tiny_llama; make_tiny_llama(Path(sys.argv[1]))" "$gguf"
  dmr package --gguf "$gguf" ai/tiny
  model=ai/tiny
fi

dmr ls
dmr run "$model" "Say hi in five words."
