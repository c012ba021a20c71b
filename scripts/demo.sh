#!/usr/bin/env bash
# The demo command of the README: builds the environment if needed, makes the synthetic shards, trains the tiny
# GLIP on CPU for a few minutes, evaluates it on the synthetic validation split and prints where everything is.
# Extra arguments go to `glip-pl demo` (e.g. --steps 100, --fresh).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck disable=SC1091
. "$ROOT/scripts/env.sh"
cd "$ROOT"
exec glip-pl demo "$@"
