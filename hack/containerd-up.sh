#!/usr/bin/env bash
# Starts a private containerd (CRI plugin, runc, cgroupfs) for tests and local runs, as
# ../shared/design/containerd-here.md describes: root, state, sockets, CNI config and logs all
# under DIR; a bridge and subnet of its own; local images only (nothing is pulled).
#
#   hack/containerd-up.sh DIR      prints CONTAINERD_SOCK=... and the test image references
#   hack/containerd-down.sh DIR    stops it by PID and removes what it left (mounts, bridge, cgroups)
set -euo pipefail
cd "$(dirname "$0")/.."
source hack/lib.sh

dir=${1:?usage: hack/containerd-up.sh DIR}
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)
need_apt containerd runc containernetworking-plugins busybox-static iproute2
need_cmd python3 "apt-get install python3"

if [ -f "$dir/containerd.pid" ] && kill -0 "$(cat "$dir/containerd.pid")" 2>/dev/null; then
  echo "containerd already running (pid $(cat "$dir/containerd.pid"))" >&2
else
  # An id of its own for the bridge (15 characters at most) and a /24 from 10.233.0.0/16.
  id=$(printf '%s' "$dir" | sha256sum | cut -c1-8)
  octet=$(( 16#${id:0:2} % 250 + 1 ))
  bridge="kedge${id:0:8}"
  subnet="10.233.${octet}.0/24"
  mkdir -p "$dir/root" "$dir/state" "$dir/cni/net.d" "$dir/cni/ipam" "$dir/images"
  echo "$bridge" > "$dir/bridge"
  echo "kedge-$id" > "$dir/cgroup-parent"
  cat > "$dir/cni/net.d/10-kedge.conflist" <<CNI
{
  "cniVersion": "0.4.0",
  "name": "kedge-$id",
  "plugins": [
    {"type": "bridge", "bridge": "$bridge", "isGateway": true, "ipMasq": false, "hairpinMode": true,
     "ipam": {"type": "host-local", "dataDir": "$dir/cni/ipam", "ranges": [[{"subnet": "$subnet"}]],
              "routes": [{"dst": "0.0.0.0/0"}]}},
    {"type": "portmap", "capabilities": {"portMappings": true}}
  ]
}
CNI
  cat > "$dir/config.toml" <<TOML
version = 2
root = "$dir/root"
state = "$dir/state"
[grpc]
  address = "$dir/containerd.sock"
[ttrpc]
  address = "$dir/containerd-ttrpc.sock"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "kedge.local/pause:test"
  restrict_oom_score_adj = true
  disable_apparmor = true
  netns_mounts_under_state_dir = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$dir/cni/net.d"
TOML
  containerd --config "$dir/config.toml" >"$dir/containerd.log" 2>&1 &
  echo $! > "$dir/containerd.pid"
  for _ in $(seq 1 100); do
    ctr -a "$dir/containerd.sock" version >/dev/null 2>&1 && break
    kill -0 "$(cat "$dir/containerd.pid")" 2>/dev/null || { cat "$dir/containerd.log" >&2; exit 1; }
    sleep 0.1
  done
  ctr -a "$dir/containerd.sock" version >/dev/null || { echo "containerd did not come up" >&2; exit 1; }
  # Test images, built from busybox-static and imported (no registry).
  python3 hack/build-image.py --ref kedge.local/pause:test --out "$dir/images/pause.tar" --cmd sleep 2147483647
  python3 hack/build-image.py --ref kedge.local/busybox:test --out "$dir/images/busybox.tar" --cmd sh
  for img in pause busybox; do
    ctr -a "$dir/containerd.sock" -n k8s.io images import "$dir/images/$img.tar" >/dev/null
  done
fi
echo "CONTAINERD_SOCK=$dir/containerd.sock"
echo "CONTAINERD_PID=$(cat "$dir/containerd.pid")"
echo "CGROUP_PARENT=/$(cat "$dir/cgroup-parent")"
echo "PAUSE_IMAGE=kedge.local/pause:test"
echo "BUSYBOX_IMAGE=kedge.local/busybox:test"
