#!/usr/bin/env bash
# Regenerates crds/ from the Rust types (common/src/crd.rs). Never edit crds/ by hand.
set -euo pipefail
cd "$(dirname "$0")/.."
rm -f crds/*.yaml
cargo run --quiet -p cloudcore -- crds --dir crds
echo "crds/ regenerated:"; ls crds
