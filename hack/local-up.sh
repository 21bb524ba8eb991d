#!/usr/bin/env bash
# Runs kedge locally. For now it builds both daemons and prints their versions and default
# configuration paths; later issues make it start cloudcore, join an edgecore and apply a pod.
set -euo pipefail
cd "$(dirname "$0")/.."
source hack/lib.sh
need_cmd cargo "install the Rust toolchain (rustup) first"

echo ">> building cloudcore and edgecore"
cargo build --locked -p cloudcore -p edgecore
for bin in cloudcore edgecore; do
  ./target/debug/$bin --version
done
echo
echo "Next steps:"
echo "  ./target/debug/cloudcore --defaultconfig   # cloudcore's configuration, with comments"
echo "  ./target/debug/edgecore --defaultconfig    # edgecore's configuration"
echo "  ./target/debug/cloudcore crds              # CRDs to kubectl apply -f"
