#!/usr/bin/env bash
# Run the whole test suite: creates .venv with dmr and its test dependencies on first use.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv 2>/dev/null || true
if ! .venv/bin/python -c 'import dmr_cli, pytest, pytest_timeout' 2>/dev/null \
   || [ pyproject.toml -nt .venv/.installed ]; then
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -e '.[dev]'
  touch .venv/.installed
fi
exec .venv/bin/pytest "$@"
