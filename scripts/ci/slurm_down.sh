#!/usr/bin/env bash
# Stop the daemons scripts/ci/slurm_up.sh started in SCRATCH_DIR (by their pid files; munged is left running:
# other users of munge on this machine may need it).
set -uo pipefail
S="${1:?usage: slurm_down.sh SCRATCH_DIR}"
for f in "$S/slurmd.pid" "$S/slurmctld.pid"; do
    [ -s "$f" ] && kill "$(cat "$f")" 2>/dev/null
done
exit 0
