#!/usr/bin/env bash
# Stops exactly what hack/local-up.sh started, by PID.
set -uo pipefail
cd "$(dirname "$0")/.."
PIDS=".local/pids"
[ -f "$PIDS" ] || { echo "nothing to stop ($PIDS missing)"; exit 0; }
while read -r name pid; do
  if kill -0 "$pid" 2>/dev/null; then
    kill "$pid" && echo "stopped $name ($pid)"
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$pid" 2>/dev/null && kill -9 "$pid" 2>/dev/null
  else
    echo "$name ($pid) was not running"
  fi
done < <(tac "$PIDS")  # newest first: the mapper and edgecore before what they use
rm -f "$PIDS"
# The private containerd: its shims, mounts, bridge and cgroups (by its own directory).
if [ -d .local/containerd ]; then
  hack/containerd-down.sh .local/containerd && echo "cleaned up containerd's mounts, bridge and cgroups"
fi
