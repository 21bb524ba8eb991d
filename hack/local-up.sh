#!/usr/bin/env bash
# Runs kedge on this machine: cloudcore attached to the cluster $KUBECONFIG points at, or, when
# there is none, to the TEST API server from tests/e2e (a local trial server, not a cluster);
# a private containerd with local images; a join token; one edgecore joined to it; an example
# pod with a ConfigMap that really runs on that edge node; and an example thermometer Device
# driven by a simulated mapper. Everything runs on 127.0.0.1 with state in .local/. Stop with
# hack/local-down.sh (or Ctrl-C while this script runs); a second run starts afresh.
set -euo pipefail
cd "$(dirname "$0")/.."
source hack/lib.sh
need_cmd cargo "install the Rust toolchain (rustup) first"

LOCAL="$PWD/.local"
if [ -f "$LOCAL/pids" ]; then
  echo ">> stopping the previous run first"
  hack/local-down.sh
fi
mkdir -p "$LOCAL"

# Ctrl-C or a failure half-way: stop exactly what was started so far.
trap 'echo; echo ">> interrupted: stopping what was started"; hack/local-down.sh; exit 130' INT TERM
trap 'rc=$?; if [ $rc -ne 0 ]; then echo ">> failed (exit $rc): stopping what was started"; hack/local-down.sh; fi' EXIT

echo ">> [1/8] building cloudcore, edgecore, the test API server and the example mapper"
cargo build --locked -p cloudcore -p edgecore -p kedge-e2e --bin test-apiserver --bin thermometer-mapper
BIN="$PWD/target/debug"
"$BIN/cloudcore" --version
"$BIN/edgecore" --version
: >"$LOCAL/pids"

echo ">> [2/8] starting a private containerd with local images (state: $LOCAL/containerd)"
CTR_ENV=$(hack/containerd-up.sh "$LOCAL/containerd")
CONTAINERD_SOCK=$(echo "$CTR_ENV" | sed -n 's/^CONTAINERD_SOCK=//p')
CGROUP_PARENT=$(echo "$CTR_ENV" | sed -n 's/^CGROUP_PARENT=//p')
BUSYBOX_IMAGE=$(echo "$CTR_ENV" | sed -n 's/^BUSYBOX_IMAGE=//p')
echo "containerd $(echo "$CTR_ENV" | sed -n 's/^CONTAINERD_PID=//p')" >>"$LOCAL/pids"

if [ -n "${KUBECONFIG:-}" ] && kubectl version --request-timeout=5s >/dev/null 2>&1; then
  KC="$KUBECONFIG"
  echo ">> [3/8] using the cluster in \$KUBECONFIG ($KC)"
else
  KC="$LOCAL/kubeconfig"
  echo ">> [3/8] no reachable cluster in \$KUBECONFIG: starting the kedge TEST API server (a local trial server, NOT a Kubernetes cluster)"
  # A fresh test server starts its resourceVersions from scratch: what the edge stored from an
  # earlier trial would look newer than everything it sends, so the edge starts empty too.
  rm -f "$LOCAL"/edgecore.db "$LOCAL"/edgecore.db-wal "$LOCAL"/edgecore.db-shm
  "$BIN/test-apiserver" --port 16443 --kubeconfig "$KC" >"$LOCAL/test-apiserver.log" 2>&1 &
  echo "test-apiserver $!" >>"$LOCAL/pids"
  TAS_PID=$!
  for _ in $(seq 50); do [ -s "$KC" ] && kubectl --kubeconfig "$KC" get ns >/dev/null 2>&1 && break; sleep 0.1; done
  kill -0 "$TAS_PID" 2>/dev/null || { echo "the test API server did not start:"; cat "$LOCAL/test-apiserver.log"; exit 1; }
fi
K() { kubectl --kubeconfig "$KC" "$@"; }
K apply --validate=false -f - >/dev/null <<YAML
apiVersion: v1
kind: Namespace
metadata:
  name: kubeedge
YAML
# The device CRDs before cloudcore starts (its device controller needs them served).
"$BIN/cloudcore" crds | K apply --validate=false -f - >/dev/null

NODE="${KEDGE_NODE:-edge-local}"
cat > "$LOCAL/cloudcore.yaml" <<YAML
kubeAPIConfig:
  kubeConfig: $KC
modules:
  cloudHub:
    certDir: $LOCAL/cloud-certs
    advertiseAddress: ["127.0.0.1"]
    websocket: {address: 127.0.0.1, port: 10000}
    https: {address: 127.0.0.1, port: 10002}
  # kubectl logs/exec/port-forward for edge pods: the API server reaches this port.
  cloudStream: {address: 127.0.0.1, port: 10350}
observability: {address: 127.0.0.1, port: 10351}
YAML
cat > "$LOCAL/edgecore.yaml" <<YAML
database:
  dataSource: $LOCAL/edgecore.db
modules:
  edgeHub:
    httpServer: https://127.0.0.1:10002
    tlsCaFile: $LOCAL/edge-certs/ca.crt
    tlsCertFile: $LOCAL/edge-certs/edge.crt
    tlsPrivateKeyFile: $LOCAL/edge-certs/edge.key
    websocket: {server: 127.0.0.1:10000}
  edged:
    hostnameOverride: $NODE
    tailoredKubeletConfig:
      containerRuntimeEndpoint: unix://$CONTAINERD_SOCK
      cgroupRoot: $CGROUP_PARENT
      podLogsDir: $LOCAL/pods
      rootDirectory: $LOCAL/edged
  deviceTwin:
    dmiSockPath: $LOCAL/dmi.sock
YAML

echo ">> [4/8] starting cloudcore (log: $LOCAL/cloudcore.log)"
RUST_LOG="${RUST_LOG:-info,cloudcore::edgecontroller=debug}" \
  "$BIN/cloudcore" --config "$LOCAL/cloudcore.yaml" >"$LOCAL/cloudcore.log" 2>&1 &
echo "cloudcore $!" >>"$LOCAL/pids"
for _ in $(seq 50); do
  grep -q "cloudhub listening" "$LOCAL/cloudcore.log" 2>/dev/null && break
  sleep 0.1
done
grep -q "cloudhub listening" "$LOCAL/cloudcore.log" || { echo "cloudcore did not start:"; cat "$LOCAL/cloudcore.log"; exit 1; }

TOKEN=$("$BIN/cloudcore" --config "$LOCAL/cloudcore.yaml" token)
echo ">> [5/8] joining $NODE with a fresh token: $TOKEN"
"$BIN/edgecore" --config "$LOCAL/edgecore.yaml" join --token "$TOKEN"

echo ">> [6/8] starting edgecore (log: $LOCAL/edgecore.log)"
RUST_LOG="${RUST_LOG:-info,edgecore::edgehub=debug}" \
  "$BIN/edgecore" --config "$LOCAL/edgecore.yaml" >"$LOCAL/edgecore.log" 2>&1 &
echo "edgecore $!" >>"$LOCAL/pids"
for _ in $(seq 50); do
  grep -q "connected to the cloud" "$LOCAL/edgecore.log" 2>/dev/null && break
  sleep 0.1
done
grep -q "connected to the cloud" "$LOCAL/edgecore.log" || { echo "edgecore did not connect:"; cat "$LOCAL/edgecore.log"; exit 1; }

for _ in $(seq 100); do K get node "$NODE" >/dev/null 2>&1 && break; sleep 0.1; done
echo ">> [7/8] applying an example ConfigMap and a pod bound to $NODE; waiting for it to run"
K apply --validate=false -f - >/dev/null <<YAML
apiVersion: v1
kind: ConfigMap
metadata:
  name: hello-config
  namespace: default
data:
  greeting: hello from the cloud
---
apiVersion: v1
kind: Pod
metadata:
  name: hello
  namespace: default
spec:
  nodeName: $NODE
  containers:
    - name: hello
      image: $BUSYBOX_IMAGE
      command: ["sh", "-c", "cat /config/greeting; echo; exec sleep 3600"]
      volumeMounts:
        - {name: config, mountPath: /config}
  volumes:
    - name: config
      configMap: {name: hello-config}
YAML
for _ in $(seq 300); do
  [ "$(K get pod hello -o jsonpath='{.status.phase}' 2>/dev/null)" = Running ] && break
  sleep 0.1
done
[ "$(K get pod hello -o jsonpath='{.status.phase}')" = Running ] || { echo "the pod did not start:"; tail -20 "$LOCAL/edgecore.log"; exit 1; }
for _ in $(seq 50); do [ -n "$(K logs hello 2>/dev/null)" ] && break; sleep 0.1; done
echo "   pod hello is Running; kubectl logs hello says: $(K logs hello 2>&1)"

echo ">> [8/8] applying the example thermometer DeviceModel + Device and starting its simulated mapper"
sed "s/nodeName: edge-1/nodeName: $NODE/" build/examples/thermometer.yaml | K apply --validate=false -f - >/dev/null
"$BIN/thermometer-mapper" --broker tcp://127.0.0.1:1883 --device default/thermo-1 >"$LOCAL/mapper.log" 2>&1 &
echo "thermometer-mapper $!" >>"$LOCAL/pids"

echo
echo "Running (PIDs in $LOCAL/pids):"
cat "$LOCAL/pids"
echo
echo "Look at:"
echo "  kubectl --kubeconfig $KC get nodes,pods -o wide                   # the edge Node and the running pod"
echo "  kubectl --kubeconfig $KC logs -f hello                            # logs through cloudcore (exec works too)"
echo "  kubectl --kubeconfig $KC get devicestatus thermo-1 -o yaml        # reported temperature, moving towards the setpoint"
echo "  kubectl --kubeconfig $KC patch device thermo-1 --type json -p '[{\"op\":\"replace\",\"path\":\"/spec/properties/1/desired/value\",\"value\":\"30\"}]'   # a new setpoint"
echo "  kubectl --server http://127.0.0.1:10550 get pods,cm -A            # the edge's own read-only API (MetaServer)"
echo "  curl -s http://127.0.0.1:10351/metrics                            # cloudcore's metrics"
echo "  ls -l $LOCAL/edge-certs                                           # the node's key and certificate (0600)"
echo "Stop with: hack/local-down.sh"
trap - INT TERM EXIT
