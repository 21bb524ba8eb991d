#!/usr/bin/env bash
# The whole test suite, as CI runs it: installs what the tests need on a fresh Debian machine,
# then formatting, lints and every test.
set -euo pipefail
cd "$(dirname "$0")/.."
source hack/lib.sh

need_cmd cargo "install the Rust toolchain (rustup) first"
# The build needs ~7 GB (debug target ~4.5 GB, the fuzz build ~2.5 GB); say what there is, so a
# full disk reads as such.
df -h . | tail -1 | awk '{print ">> disk: " $4 " free of " $2}'
cargo fmt --version >/dev/null 2>&1 || { echo "error: rustfmt missing (rustup component add rustfmt)" >&2; exit 1; }
cargo clippy --version >/dev/null 2>&1 || { echo "error: clippy missing (rustup component add clippy)" >&2; exit 1; }
# System packages the tests use: a C compiler (ring) and kubectl (the e2e tests drive the test
# API server with the real client; the machine image ships it, Debian's package is the fallback).
need_cmd cc "apt-get install gcc"
command -v kubectl >/dev/null 2>&1 || need_apt kubernetes-client || true
need_cmd kubectl "the e2e tests need kubectl on PATH"
# edged's runtime tests run a private containerd (hack/containerd-up.sh) with runc, CNI plugins
# and test images built from busybox-static by a Python script.
need_apt containerd runc containernetworking-plugins busybox-static iproute2
# Image pulls with credentials are tested against a real registry (Debian's docker-registry with
# htpasswd auth), the test images pushed into it with skopeo.
need_apt docker-registry skopeo apache2-utils
# The device tests run against an external MQTT broker too (started by the test on a free port).
need_apt mosquitto
command -v python3 >/dev/null 2>&1 || need_apt python3

echo ">> cargo fmt --check"
cargo fmt --all -- --check

echo ">> cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings

echo ">> tests"
# Everything the tests need was installed above: no test may skip itself here.
export KEDGE_E2E_REQUIRE_ALL=1
if cargo nextest --version >/dev/null 2>&1; then
  # nextest does not run doctests; run them first so nextest's summary is the closing line.
  cargo test --workspace --locked --doc --quiet
  cargo nextest run --workspace --locked --no-fail-fast
else
  cargo test --workspace --locked --no-fail-fast
fi

# Every parser of untrusted input, fuzzed briefly from its committed corpus (fuzz/); the
# instrumented build is separate (fuzz/target) and is most of this step's time.
echo ">> fuzz targets (10 s each)"
hack/fuzz.sh 10
