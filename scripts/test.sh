#!/usr/bin/env bash
# Runs every test of ElixirScope Native, failing fast:
#   1. the Rust unit/integration tests (all crates but the NIF cdylib),
#   2. the loom model check of the core's concurrency (if present),
#   3. the Elixir test suite (extra arguments are passed to `mix test`).
#
#   bash scripts/test.sh                    # everything
#   bash scripts/test.sh --only consumer    # ... with `mix test` filters
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source=scripts/ensure_toolchain.sh
source scripts/ensure_toolchain.sh

stage() { printf '\n==> [test %s] %s\n' "$1" "$2"; }

# The NIF crate is a cdylib linked against the Erlang VM: its tests cannot
# run outside the VM, it is exercised by the Elixir tests instead.
stage "1/3" "cargo test --workspace --exclude elixir_scope_nif --release"
cargo test --workspace --exclude elixir_scope_nif --release

if [[ -f native/elixir_scope_core/tests/loom.rs ]]; then
  stage "2/3" "loom model check: cargo test -p elixir_scope_core --test loom --release (RUSTFLAGS=--cfg loom)"
  RUSTFLAGS="--cfg loom" CARGO_TARGET_DIR=target/loom \
    cargo test -p elixir_scope_core --test loom --release
else
  stage "2/3" "loom model check: skipped (native/elixir_scope_core/tests/loom.rs not found)"
fi

stage "3/3" "MIX_ENV=test mix test $*"
MIX_ENV="test" mix test "$@"
