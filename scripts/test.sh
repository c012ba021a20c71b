#!/usr/bin/env bash
# The test command of the README: builds the environment if needed, then runs the whole suite on CPU.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck disable=SC1091
. "$ROOT/scripts/env.sh"
cd "$ROOT"
exec python -m pytest tests -q "$@"
