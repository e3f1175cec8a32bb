#!/usr/bin/env bash
# Runs the ElixirScope Native cluster demo (scripts/cluster_demo.exs): three
# local nodes on loopback, a client -> shop -> pricer app across them, traced
# as one cluster; prints the cross-node call tree, the merged message flow
# and each node's accounting.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source=scripts/ensure_toolchain.sh
source scripts/ensure_toolchain.sh

mix run scripts/cluster_demo.exs "$@"
