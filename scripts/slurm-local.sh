#!/usr/bin/env bash
# Start a one-node SLURM cluster on this machine (slurmctld + slurmd + munge), installing Debian's
# slurm-wlm and munge first when they are missing. For the cluster tests and for trying the SLURM
# launcher without a cluster. Needs root. Idempotent: a cluster that already answers is left alone.
#   SLURM_CONF_DIR=/etc/slurm   where slurm.conf goes (the Debian packages read it there)
# Prints the partition's name when the cluster is up; exits non-zero, saying why, otherwise.
set -euo pipefail
conf_dir=${SLURM_CONF_DIR:-/etc/slurm}

if sinfo -h -o %P >/dev/null 2>&1 && [ -n "$(sinfo -h -o %P 2>/dev/null)" ]; then
  sinfo -h -o %P | head -n1 | tr -d '*'
  exit 0
fi
if [ "$(id -u)" != 0 ]; then
  echo "slurm-local: needs root (to install and start slurmctld, slurmd and munged)" >&2
  exit 2
fi
if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
  command -v apt-get >/dev/null || { echo "slurm-local: no slurmctld/munged and no apt-get to install them" >&2; exit 2; }
  echo "slurm-local: installing slurm-wlm and munge" >&2
  apt-get update -q >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurm-wlm munge >/dev/null
fi

host=$(hostname -s)
cpus=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)  # nproc obeys them: 1 under OMP_NUM_THREADS=1
memory_mb=$(awk '/MemTotal/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)
mkdir -p "$conf_dir" /var/spool/slurmctld /var/spool/slurmd /var/log/slurm /run/munge
# No cgroup.conf: Slurm 22.05 rejects CgroupPlugin=disabled, and these plugins need none.
cat >"$conf_dir/slurm.conf" <<EOF
ClusterName=l2m-local
SlurmctldHost=$host
SlurmUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
SchedulerType=sched/backfill
JobRequeue=1
ReturnToService=2
KillWait=30
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
NodeName=$host CPUs=$cpus RealMemory=$memory_mb State=UNKNOWN
PartitionName=local Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF

chown munge:munge /run/munge 2>/dev/null || true
pgrep -x munged >/dev/null || munged --force
pgrep -x slurmctld >/dev/null || slurmctld
pgrep -x slurmd >/dev/null || slurmd
for _ in $(seq 30); do
  if [ "$(sinfo -h -o %t 2>/dev/null | head -n1)" = idle ]; then
    echo local
    exit 0
  fi
  scontrol update nodename="$host" state=resume >/dev/null 2>&1 || true
  sleep 1
done
echo "slurm-local: the node did not come up; see /var/log/slurm/slurmctld.log and slurmd.log" >&2
exit 1
