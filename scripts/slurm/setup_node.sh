#!/usr/bin/env bash
# Sourced by the Slurm launchers on the compute node: load the site's environment, activate glip_pl's, install
# nothing (compute nodes are often offline, and a pip install racing on a shared file system breaks environments).
#
#   GLIP_PL_ROOT   the repository (default: the submit directory)
#   GLIP_PL_SETUP  a file sourced first, for the site's `module load cuda/...`, a conda env or a container wrapper
#   GLIP_PL_VENV   the virtual environment to activate (default ROOT/.venv; made once on the login node with
#                  `bash scripts/test.sh --co -q` or `. scripts/env.sh`); skipped when it does not exist, so an
#                  environment set up by GLIP_PL_SETUP is used as it is
ROOT="${GLIP_PL_ROOT:-${SLURM_SUBMIT_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)}}"
cd "$ROOT"
if [ -n "${GLIP_PL_SETUP:-}" ]; then
    if [ ! -f "$GLIP_PL_SETUP" ]; then
        echo "[glip_pl] GLIP_PL_SETUP=$GLIP_PL_SETUP: no such file" >&2
        exit 2
    fi
    # shellcheck disable=SC1090
    . "$GLIP_PL_SETUP"
fi
# shellcheck disable=SC1091
[ -f "${GLIP_PL_VENV:-$ROOT/.venv}/bin/activate" ] && . "${GLIP_PL_VENV:-$ROOT/.venv}/bin/activate"
if ! python -c "import glip_pl" 2>/dev/null; then
    echo "[glip_pl] glip_pl is not importable on $(hostname): create the environment on the login node first" \
         "(. scripts/env.sh), or point GLIP_PL_VENV / GLIP_PL_SETUP at one" >&2
    exit 2
fi
# Nothing reaches for a hub at run time; W&B goes online only with a key (README, "Weights & Biases"). sbatch
# exports the submitting shell's environment: a W&B service address from there would point at another host's
# process, so every task starts its own.
unset WANDB_SERVICE
export WANDB_MODE="${WANDB_MODE:-$([ -n "${WANDB_API_KEY:-}" ] && echo online || echo offline)}"
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}" TOKENIZERS_PARALLELISM=false
# one intra-op thread per CPU the task was given (Lightning's CPU default would use every core of the node)
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}"
