#!/usr/bin/env bash
# Viewer check in a real browser: installs Chromium (Debian) and, from npm,
# speedscope (its static app, dist/release/index.html), playwright-core
# (driving the system Chromium) and ajv (JSON Schema validation); exports
# the demo app's trace (scripts/viewer_check.exs); validates the speedscope
# export against the schema speedscope publishes and the Chrome trace
# against the format's rules; loads the speedscope export and the folded
# stacks into speedscope's own index.html offline in headless Chromium and
# the SVG flame graph into Chromium; saves screenshots. Fails on an import
# error, a validation error, or a view without the demo's frames.
#
# Usage: scripts/viewer_check.sh [OUT_DIR]   (default tmp/viewer_check)
# npm packages go to $VIEWER_NODE_DIR (default ~/.cache/elixir_scope/viewer_node).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source=scripts/ensure_toolchain.sh
source scripts/ensure_toolchain.sh

OUT="${1:-tmp/viewer_check}"
NODE_DIR="${VIEWER_NODE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/elixir_scope/viewer_node}"
mkdir -p "$OUT" "$NODE_DIR"
OUT="$(cd "$OUT" && pwd)"
NODE_DIR="$(cd "$NODE_DIR" && pwd)"

if ! command -v chromium >/dev/null 2>&1; then
  echo "==> installing chromium (Debian)"
  sudo_cmd=""
  [ "$(id -u)" -ne 0 ] && sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq chromium >/dev/null
fi
if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
  echo "==> installing nodejs and npm (Debian)"
  sudo_cmd=""
  [ "$(id -u)" -ne 0 ] && sudo_cmd="sudo"
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq nodejs npm >/dev/null
fi

if [ ! -f "$NODE_DIR/node_modules/speedscope/dist/release/index.html" ] ||
   [ ! -d "$NODE_DIR/node_modules/playwright-core" ] || [ ! -d "$NODE_DIR/node_modules/ajv" ]; then
  echo "==> installing speedscope, playwright-core and ajv (npm) into $NODE_DIR"
  [ -f "$NODE_DIR/package.json" ] || echo '{"private": true}' > "$NODE_DIR/package.json"
  PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm install --prefix "$NODE_DIR" --no-audit --no-fund --silent \
    speedscope@1.25.0 playwright-core@1.65.1 ajv@8
fi

echo "==> exporting the demo app's trace into $OUT"
MIX_ENV="${MIX_ENV:-dev}" mix run scripts/viewer_check.exs "$OUT"

echo "==> validating and loading into the viewers"
NODE_PATH="$NODE_DIR/node_modules" node scripts/viewer_check.js "$OUT" "$NODE_DIR/node_modules" \
  test/support/fixtures/speedscope-file-format-schema.json "$(command -v chromium)"
