#!/usr/bin/env bash
# Stop exactly what scripts/up.sh started for this SLUICEGATE_HOME: each recorded
# process group, checked by pid and start time so a reused pid is never hit.
set -uo pipefail
cd "$(dirname "$0")/.."
export SLUICEGATE_HOME=$(realpath -m "${SLUICEGATE_HOME:-$(pwd)/.sluicegate}")
RUN=$SLUICEGATE_HOME/run

stop() {
  local name=$1 pidfile=$RUN/$1.pid pid start i
  [ -f "$pidfile" ] || return 0
  read -r pid start < "$pidfile"
  if [ -r "/proc/$pid/stat" ] && [ "$(awk '{print $22}' "/proc/$pid/stat")" = "$start" ]; then
    kill -TERM -- "-$pid" 2>/dev/null
    for ((i = 0; i < 20; i++)); do
      kill -0 -- "-$pid" 2>/dev/null || break
      sleep 0.5
    done
    kill -KILL -- "-$pid" 2>/dev/null && echo "$name: killed (did not stop on TERM)" || echo "$name: stopped"
  else
    echo "$name: was not running"
  fi
  rm -f "$pidfile"
}

for name in serve worker mlflow prefect-server; do
  stop "$name"
done
