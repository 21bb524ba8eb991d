#!/usr/bin/env bash
# Runs kedge on this machine: cloudcore attached to the cluster $KUBECONFIG points at, or, when
# there is none, to the TEST API server from tests/e2e (a local trial server, not a cluster);
# a join token; one edgecore joined to it; and an example pod with a ConfigMap bound to that edge
# node. Everything runs on 127.0.0.1 with state in .local/. Stop with hack/local-down.sh.
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

echo ">> building cloudcore, edgecore and the test API server"
cargo build --locked -p cloudcore -p edgecore -p kedge-e2e --bin test-apiserver
BIN="$PWD/target/debug"
"$BIN/cloudcore" --version
"$BIN/edgecore" --version
: >"$LOCAL/pids"

if [ -n "${KUBECONFIG:-}" ] && kubectl version --request-timeout=5s >/dev/null 2>&1; then
  KC="$KUBECONFIG"
  echo ">> using the cluster in \$KUBECONFIG ($KC)"
else
  KC="$LOCAL/kubeconfig"
  echo ">> no reachable cluster in \$KUBECONFIG: starting the kedge TEST API server (a local trial server, NOT a Kubernetes cluster)"
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
YAML

echo ">> starting cloudcore (log: $LOCAL/cloudcore.log)"
RUST_LOG="${RUST_LOG:-info,cloudcore::edgecontroller=debug}" \
  "$BIN/cloudcore" --config "$LOCAL/cloudcore.yaml" >"$LOCAL/cloudcore.log" 2>&1 &
echo "cloudcore $!" >>"$LOCAL/pids"
for _ in $(seq 50); do
  grep -q "cloudhub listening" "$LOCAL/cloudcore.log" 2>/dev/null && break
  sleep 0.1
done
grep -q "cloudhub listening" "$LOCAL/cloudcore.log" || { echo "cloudcore did not start:"; cat "$LOCAL/cloudcore.log"; exit 1; }

TOKEN=$("$BIN/cloudcore" --config "$LOCAL/cloudcore.yaml" token)
echo ">> join token: $TOKEN"
"$BIN/edgecore" --config "$LOCAL/edgecore.yaml" join --token "$TOKEN"

echo ">> starting edgecore (log: $LOCAL/edgecore.log)"
RUST_LOG="${RUST_LOG:-info,edgecore::edgehub=debug}" \
  "$BIN/edgecore" --config "$LOCAL/edgecore.yaml" >"$LOCAL/edgecore.log" 2>&1 &
echo "edgecore $!" >>"$LOCAL/pids"
for _ in $(seq 50); do
  grep -q "connected to the cloud" "$LOCAL/edgecore.log" 2>/dev/null && break
  sleep 0.1
done
grep -q "connected to the cloud" "$LOCAL/edgecore.log" || { echo "edgecore did not connect:"; cat "$LOCAL/edgecore.log"; exit 1; }

for _ in $(seq 100); do K get node "$NODE" >/dev/null 2>&1 && break; sleep 0.1; done
echo ">> applying an example ConfigMap and a pod bound to $NODE"
K apply --validate=false -f - <<YAML
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
      image: busybox
      command: ["sh", "-c", "cat /config/greeting; sleep 3600"]
      volumeMounts:
        - {name: config, mountPath: /config}
  volumes:
    - name: config
      configMap: {name: hello-config}
YAML

echo
echo "Running (PIDs in $LOCAL/pids):"
cat "$LOCAL/pids"
echo
echo "Look at:"
echo "  kubectl --kubeconfig $KC get node $NODE --show-labels        # the edge Node cloudcore registered"
echo "  kubectl --kubeconfig $KC -n kube-node-lease get lease $NODE -o yaml   # renewed while the node is connected"
echo "  grep -E 'edge node connected|initial sync' $LOCAL/cloudcore.log"
echo "  grep 'to node' $LOCAL/cloudcore.log          # the ConfigMap, then the pod, queued for $NODE"
echo "  grep 'stored; acking' $LOCAL/edgecore.log      # ...stored on the edge and acknowledged"
echo "  kubectl --server http://127.0.0.1:10550 get pods,cm -A      # the edge's own read-only API (MetaServer)"
echo "  ls -l $LOCAL/edge-certs                                     # the node's key and certificate (0600)"
echo "Stop with: hack/local-down.sh"
