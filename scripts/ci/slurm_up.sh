#!/usr/bin/env bash
# A real one-node Slurm on this machine (munge + slurmctld + slurmd on localhost), for the Slurm test and CI.
# Follows the measured recipe in the team's local_slurm.md: Debian's slurm 22.05, proctrack/linuxproc, task/none,
# no cgroups or accounting; cred_expire=10 and a 1-2 s scheduler so a requeued job restarts in about 12 s.
#
#   sudo scripts/ci/slurm_up.sh SCRATCH_DIR      # then: export SLURM_CONF=SCRATCH_DIR/slurm.conf
#   scripts/ci/slurm_down.sh SCRATCH_DIR
#
# Needs root (daemons, apt-get). Writes nothing under /etc/slurm: the config lives in SCRATCH_DIR and clients find
# it through SLURM_CONF; ports 6917/6918 (or SLURMCTLD_PORT / SLURMD_PORT) keep clear of a Slurm already here. Installs the 4 packages
# (slurmctld slurmd slurm-client munge) with apt-get when slurmctld is missing (about 6 s on Debian 12).
set -euo pipefail
S="$(mkdir -p "${1:?usage: slurm_up.sh SCRATCH_DIR}" && cd "$1" && pwd)"
export DEBIAN_FRONTEND=noninteractive
if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
fi
[ -s /etc/munge/munge.key ] || runuser -u munge -- mungekey --create
mkdir -p /run/munge && chown munge:munge /run/munge
if ! munge -n >/dev/null 2>&1; then
    runuser -u munge -- /usr/sbin/munged
    for _ in $(seq 1 50); do munge -n >/dev/null 2>&1 && break; sleep 0.1; done
fi
mkdir -p "$S/spool/ctld" "$S/spool/d" "$S/log"
MEM=$(( $(free -m | awk '/^Mem:/{print $2}') * 9 / 10 ))
cat > "$S/slurm.conf" <<CONF
ClusterName=glipci
SlurmctldHost=localhost
SlurmctldPort=${SLURMCTLD_PORT:-6917}
SlurmdPort=${SLURMD_PORT:-6918}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# requeued jobs wait cred_expire s before they may start again (default 120, min 5)
AuthInfo=cred_expire=10
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1,sched_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1000
ReturnToService=2
JobRequeue=1
KillWait=5
MinJobAge=600
MailProg=/bin/true
StateSaveLocation=$S/spool/ctld
SlurmdSpoolDir=$S/spool/d
SlurmctldPidFile=$S/slurmctld.pid
SlurmdPidFile=$S/slurmd.pid
SlurmctldLogFile=$S/log/slurmctld.log
SlurmdLogFile=$S/log/slurmd.log
NodeName=localhost CPUs=$(nproc) RealMemory=$MEM State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF
export SLURM_CONF="$S/slurm.conf"
slurmctld -f "$SLURM_CONF"
slurmd -f "$SLURM_CONF"
for _ in $(seq 1 120); do
    [ "$(sinfo -h -o %T 2>/dev/null | head -n 1)" = idle ] && break
    sleep 0.5
done
sinfo
[ "$(sinfo -h -o %T | head -n 1)" = idle ] || { echo "slurm_up: node not idle; see $S/log" >&2; exit 1; }
echo "export SLURM_CONF=$SLURM_CONF"
