#!/usr/bin/env bash
# Set up and run the gateway on the embedded default (SQLite + ./var), config ./consentgate.toml.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
if [ ! -f consentgate.toml ]; then
  cp config/consentgate.toml consentgate.toml
  echo "[run] wrote ./consentgate.toml from config/consentgate.toml: edit [[peers]] for your modalities" >&2
fi
.venv/bin/consentgate --config consentgate.toml init
exec .venv/bin/consentgate --config consentgate.toml serve
