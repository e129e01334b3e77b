#!/usr/bin/env bash
# Test services: a single-node SLURM (munge + slurmctld + slurmd on loopback) for tests/test_slurm*.py.
#
# Idempotent: installs Debian's slurm-wlm and munge if missing, writes /etc/slurm/slurm.conf, and starts the
# daemons that are not running yet. Needs root (no systemd or cgroups: proctrack/linuxproc, task/none).
# Run it before pytest (the Makefile's test target does). Exits non-zero with a message when it cannot.
set -euo pipefail

if [[ $(id -u) -ne 0 ]]; then
  echo "services.sh: must run as root to install and start SLURM (tests/test_slurm*.py need it)" >&2
  exit 1
fi

if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null || ! command -v slurmd >/dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q >/dev/null
  apt-get install -y -q --no-install-recommends slurm-wlm munge >/dev/null
fi

# munge: a key, and the daemon running as the munge user with /run/munge owned by it.
if [[ ! -s /etc/munge/munge.key ]]; then
  mkdir -p /etc/munge
  dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
fi
chown -R munge:munge /etc/munge && chmod 0700 /etc/munge && chmod 0400 /etc/munge/munge.key
mkdir -p /run/munge /var/log/munge /var/lib/munge
chown munge:munge /run/munge /var/log/munge /var/lib/munge
if ! pgrep -u munge -x munged >/dev/null; then
  rm -f /run/munge/munge.socket.2.lock
  su -s /bin/sh munge -c "/usr/sbin/munged --force"
fi
for _ in $(seq 50); do munge -n >/dev/null 2>&1 && break; sleep 0.1; done
munge -n | unmunge >/dev/null

# slurm.conf: one node (this machine, called localhost) with the CPUs and memory slurmd detects.
mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm /run/slurm
chown slurm:slurm /var/spool/slurmctld /var/log/slurm 2>/dev/null || true
node_line=$(slurmd -C | head -1 | sed -E 's/^NodeName=[^ ]+/NodeName=localhost/; s/ UpTime=.*//')
conf=$(cat <<CONF
# Written by .ci/services.sh: a single-node test cluster on loopback.
ClusterName=segfactory-ci
SlurmctldHost=localhost(127.0.0.1)
CommunicationParameters=NoCtldInAddrAny,NoInAddrAny
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
ReturnToService=2
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurm/slurmctld.pid
SlurmdPidFile=/run/slurm/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
MpiDefault=none
KillWait=5
MinJobAge=30
$node_line State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
CONF
)
if [[ ! -f /etc/slurm/slurm.conf ]] || [[ "$(cat /etc/slurm/slurm.conf)" != "$conf" ]]; then
  printf '%s\n' "$conf" > /etc/slurm/slurm.conf
  # A changed config needs fresh daemons.
  for pidfile in /run/slurm/slurmctld.pid /run/slurm/slurmd.pid; do
    [[ -s $pidfile ]] && kill "$(cat "$pidfile")" 2>/dev/null || true
  done
  sleep 1
fi
pgrep -x slurmctld >/dev/null || slurmctld
pgrep -x slurmd >/dev/null || slurmd -N localhost

for _ in $(seq 100); do
  if sinfo -h -N -o '%T' 2>/dev/null | grep -Eq '^(idle|mixed|allocated)'; then
    echo "services.sh: SLURM up ($(sinfo -h -N -o '%N %T %c CPUs %m MB'))"
    exit 0
  fi
  scontrol update NodeName=localhost State=RESUME >/dev/null 2>&1 || true
  sleep 0.3
done
echo "services.sh: SLURM did not come up; see /var/log/slurm/slurmctld.log and slurmd.log" >&2
sinfo -N -l >&2 || true
exit 1
