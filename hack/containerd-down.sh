#!/usr/bin/env bash
# Stops the containerd that hack/containerd-up.sh DIR started, by its PID, and removes what it
# left outside its files: shims, mounts under DIR, the bridge, the cgroups of its pods.
set -uo pipefail
dir=${1:?usage: hack/containerd-down.sh DIR}
[ -d "$dir" ] || exit 0
dir=$(cd "$dir" && pwd)
sock="$dir/containerd.sock"
if [ -S "$sock" ]; then
  # Containers first, so their shims exit.
  for t in $(ctr -a "$sock" -n k8s.io tasks ls -q 2>/dev/null); do
    ctr -a "$sock" -n k8s.io tasks kill -s SIGKILL "$t" >/dev/null 2>&1
  done
fi
if [ -f "$dir/containerd.pid" ]; then
  pid=$(cat "$dir/containerd.pid")
  kill "$pid" 2>/dev/null
  for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -9 "$pid" 2>/dev/null
  rm -f "$dir/containerd.pid"
fi
# Shims outlive containerd; theirs name our socket.
pkill -9 -f "containerd-shim-runc-v2 .*-address $sock" 2>/dev/null
sleep 0.2
# Mounts under DIR (rootfs overlays, netns, shm), deepest first.
awk -v d="$dir/" 'index($2, d) == 1 {print $2}' /proc/mounts | sort -r | while read -r m; do
  umount -l "$m" 2>/dev/null
done
[ -f "$dir/bridge" ] && ip link del "$(cat "$dir/bridge")" 2>/dev/null
if [ -f "$dir/cgroup-parent" ]; then
  parent=$(cat "$dir/cgroup-parent")
  for root in /sys/fs/cgroup/*/ /sys/fs/cgroup/; do
    [ -d "$root$parent" ] && find "$root$parent" -depth -type d -exec rmdir {} + 2>/dev/null
  done
fi
exit 0
