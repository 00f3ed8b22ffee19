#!/usr/bin/env bash
# Set everything up, then run the end-to-end demo. Extra arguments go to the demo.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/python examples/demo.py "$@"
