#!/usr/bin/env bash
# Makes sure the toolchain needed to build and test ElixirScope Native is
# present: Rust (cargo, rustfmt, clippy), Elixir/Erlang (elixir, mix, erl
# and the erlang-dev headers) and Prometheus (promtool, prometheus).
#
# Idempotent and silent when everything is already there. Meant to be
# `source`d by scripts/test.sh, scripts/demo.sh and .ci/run, so that the PATH
# and locale it exports persist in the caller; it can also be run directly:
#
#   bash scripts/ensure_toolchain.sh        # check / install
#   source scripts/ensure_toolchain.sh      # ... and keep PATH/LANG
#
# Elixir and Erlang come from Debian's packages (apt-get); hex.pm is not
# needed, the project has no hex dependencies.

# When executed, be strict. When sourced, don't change the caller's shell
# options (an interactive shell must not inherit `set -e`/`set -u`); our own
# callers already run with `set -euo pipefail`, and every step below checks
# its own errors and `return`s a failure.
if [[ "${BASH_SOURCE[0]}" == "${0}" ]]; then
  set -euo pipefail
fi

_es_log() { printf 'ensure_toolchain: %s\n' "$*" >&2; }

_es_have() { command -v "$1" >/dev/null 2>&1; }

# Run a command as root: directly if we are root, with sudo if it exists.
_es_as_root() {
  if [[ "$(id -u)" == "0" ]]; then
    "$@"
  elif _es_have sudo; then
    sudo "$@"
  else
    _es_log "need root to run '$*' but not root and sudo is missing"
    return 1
  fi
}

# True when erl_nif.h (package erlang-dev) is installed.
_es_have_erl_nif_h() {
  local f
  for f in /usr/include/erl_nif.h /usr/lib/erlang/usr/include/erl_nif.h \
    /usr/local/lib/erlang/usr/include/erl_nif.h; do
    [[ -f "$f" ]] && return 0
  done
  # Erlang installed somewhere else: ask it where its root is.
  if _es_have erl; then
    local root
    root="$(erl -noshell -eval 'io:format("~s", [code:root_dir()]), halt().' 2>/dev/null)" || return 1
    [[ -n "$root" ]] || return 1
    for f in "$root"/usr/include/erl_nif.h "$root"/erts-*/include/erl_nif.h; do
      [[ -f "$f" ]] && return 0
    done
  fi
  return 1
}

_es_ensure_rust() {
  if ! _es_have cargo && [[ -x "${HOME}/.cargo/bin/cargo" ]]; then
    export PATH="${HOME}/.cargo/bin:${PATH}"
  fi
  if ! _es_have cargo; then
    _es_log "cargo not found (neither on PATH nor in ~/.cargo/bin): install Rust with rustup"
    return 1
  fi
  if ! cargo fmt --version >/dev/null 2>&1 || ! cargo clippy --version >/dev/null 2>&1; then
    if ! _es_have rustup; then
      _es_log "cargo fmt / cargo clippy missing and rustup not found"
      return 1
    fi
    _es_log "adding rustup components rustfmt and clippy"
    rustup component add rustfmt clippy >&2 || return 1
  fi
}

_es_ensure_elixir() {
  if _es_have elixir && _es_have mix && _es_have erl && _es_have_erl_nif_h; then
    return 0
  fi
  _es_log "installing Elixir/Erlang from Debian packages (apt-get)"
  _es_as_root apt-get update -q >&2 || return 1
  _es_as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
    elixir erlang-dev erlang-dialyzer erlang-os-mon erlang-tools >&2 || return 1
  hash -r
  local tool
  for tool in elixir mix erl; do
    if ! _es_have "$tool"; then
      _es_log "'$tool' still missing after apt-get install"
      return 1
    fi
  done
  if ! _es_have_erl_nif_h; then
    _es_log "erl_nif.h still missing after installing erlang-dev"
    return 1
  fi
}

# promtool (Debian package prometheus) checks the rendered Prometheus text
# in the tests; scripts/prometheus_scrape.sh runs the prometheus server.
_es_ensure_prometheus() {
  if _es_have promtool && _es_have prometheus; then
    return 0
  fi
  _es_log "installing prometheus (promtool) from Debian packages (apt-get)"
  _es_as_root apt-get update -q >&2 || return 1
  _es_as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q prometheus >&2 || return 1
  hash -r
  if ! _es_have promtool; then
    _es_log "'promtool' still missing after apt-get install prometheus"
    return 1
  fi
}

_es_ensure_locale() {
  # Elixir warns when the VM is not running with a UTF-8 locale.
  if [[ -z "${LANG:-}" ]]; then
    export LANG=C.UTF-8
  fi
  if [[ -z "${LC_ALL:-}" ]]; then
    export LC_ALL=C.UTF-8
  fi
}

_es_ensure_toolchain() {
  _es_ensure_locale
  _es_ensure_rust || return 1
  _es_ensure_elixir || return 1
  _es_ensure_prometheus || return 1
}

if [[ "${BASH_SOURCE[0]}" == "${0}" ]]; then
  _es_ensure_toolchain
else
  _es_ensure_toolchain || return 1
fi
