#!/usr/bin/env bash
# Runs the ElixirScope Native demo (scripts/demo.exs): concurrent writers and
# a reader on the Rust ring buffer, with throughput and accounting.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source=scripts/ensure_toolchain.sh
source scripts/ensure_toolchain.sh

mix run scripts/demo.exs "$@"
