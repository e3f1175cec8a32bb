#!/usr/bin/env bash
# A real Prometheus server on loopback scrapes a pipeline's /metrics
# endpoint for a few seconds, then its HTTP API is asked for
# elixir_scope_events_processed_total (see scripts/prometheus_scrape.exs).
# Installs what it needs (Elixir, Rust build, the prometheus package).
#
#   bash scripts/prometheus_scrape.sh            # SCRAPE_SECONDS=6 by default
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source=scripts/ensure_toolchain.sh
source scripts/ensure_toolchain.sh

mix run scripts/prometheus_scrape.exs
