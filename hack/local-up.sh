#!/usr/bin/env bash
# Runs kedge on this machine: cloudcore (CloudHub on 127.0.0.1, certificates kept in .local/),
# a join token, and one edgecore joined to it. Stop with hack/local-down.sh.
# Until the cloud controllers land, cloudcore does not attach to a cluster: this shows the link
# (join, mutual TLS, keepalives, reconnects).
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

echo ">> building cloudcore and edgecore"
cargo build --locked -p cloudcore -p edgecore
BIN="$PWD/target/debug"
"$BIN/cloudcore" --version
"$BIN/edgecore" --version

NODE="${KEDGE_NODE:-edge-local}"
cat > "$LOCAL/cloudcore.yaml" <<YAML
modules:
  cloudHub:
    certDir: $LOCAL/cloud-certs
    advertiseAddress: ["127.0.0.1"]
    websocket: {address: 127.0.0.1, port: 10000}
    https: {address: 127.0.0.1, port: 10002}
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
"$BIN/cloudcore" --config "$LOCAL/cloudcore.yaml" >"$LOCAL/cloudcore.log" 2>&1 &
echo "cloudcore $!" >"$LOCAL/pids"
for _ in $(seq 50); do
  grep -q "cloudhub listening" "$LOCAL/cloudcore.log" 2>/dev/null && break
  sleep 0.1
done
grep -q "cloudhub listening" "$LOCAL/cloudcore.log" || { echo "cloudcore did not start:"; cat "$LOCAL/cloudcore.log"; exit 1; }

TOKEN=$("$BIN/cloudcore" --config "$LOCAL/cloudcore.yaml" token)
echo ">> join token: $TOKEN"
"$BIN/edgecore" --config "$LOCAL/edgecore.yaml" join --token "$TOKEN"

echo ">> starting edgecore (log: $LOCAL/edgecore.log)"
"$BIN/edgecore" --config "$LOCAL/edgecore.yaml" >"$LOCAL/edgecore.log" 2>&1 &
echo "edgecore $!" >>"$LOCAL/pids"
for _ in $(seq 50); do
  grep -q "connected to the cloud" "$LOCAL/edgecore.log" 2>/dev/null && break
  sleep 0.1
done

echo
echo "Running (PIDs in $LOCAL/pids):"
cat "$LOCAL/pids"
echo
echo "Look at:"
echo "  grep 'edge node connected' $LOCAL/cloudcore.log   # the node's session on the cloud"
echo "  grep 'connected to the cloud' $LOCAL/edgecore.log # the link from the edge"
echo "  ls -l $LOCAL/edge-certs                           # the node's key and certificate (0600)"
echo "Stop with: hack/local-down.sh"
