#!/usr/bin/env bash
# Set up everything consentgate needs on a Debian machine; safe to run again.
#   scripts/setup.sh          runtime: Python venv with consentgate installed
#   scripts/setup.sh --test   also the test peers: DCMTK, Orthanc, PostgreSQL reachable
set -euo pipefail
cd "$(dirname "$0")/.."

want_test=0
[ "${1:-}" = "--test" ] && want_test=1

log() { printf '[setup] %s\n' "$*" >&2; }

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
    log "need root to run: $*"; exit 1; fi
}

apt_updated=0
apt_install() {
  local missing=()
  for pkg in "$@"; do dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg"); done
  [ ${#missing[@]} -eq 0 ] && return 0
  if [ $apt_updated -eq 0 ]; then as_root apt-get update -qq; apt_updated=1; fi
  log "installing Debian packages: ${missing[*]}"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    "${missing[@]}" >/dev/null
}

# Python 3.11 with venv (Debian 12's python3 is 3.11)
PYTHON=${PYTHON:-}
if [ -z "$PYTHON" ]; then
  for candidate in python3.11 python3; do
    if command -v "$candidate" >/dev/null && \
       "$candidate" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' 2>/dev/null; then
      PYTHON=$(command -v "$candidate"); break
    fi
  done
fi
if [ -z "$PYTHON" ]; then
  apt_install python3 python3-venv
  PYTHON=$(command -v python3)
fi
if ! "$PYTHON" -c 'import venv, ensurepip' 2>/dev/null; then apt_install python3-venv; fi

if [ ! -x .venv/bin/python ]; then
  log "creating .venv with $PYTHON"
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.consentgate-installed
[ $want_test -eq 1 ] && stamp=.venv/.consentgate-installed-test
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  log "installing consentgate into .venv"
  .venv/bin/python -m pip install -q --upgrade pip >/dev/null
  if [ $want_test -eq 1 ]; then
    .venv/bin/python -m pip install -q -e ".[test]"
  else
    .venv/bin/python -m pip install -q -e .
  fi
  touch "$stamp"
fi

if [ $want_test -eq 1 ]; then
  # real peers the tests talk to
  apt_install dcmtk orthanc
  # PostgreSQL on 127.0.0.1:5432 with trust auth for the postgres user
  if ! .venv/bin/python - <<'PY' 2>/dev/null
import psycopg
psycopg.connect("host=127.0.0.1 port=5432 user=postgres dbname=postgres", connect_timeout=3).close()
PY
  then
    apt_install postgresql
    cluster=$(ls /etc/postgresql 2>/dev/null | sort -V | tail -n 1)
    log "starting PostgreSQL $cluster"
    as_root pg_ctlcluster --skip-systemctl-redirect "$cluster" main start || true
    hba=/etc/postgresql/$cluster/main/pg_hba.conf
    if ! as_root grep -q '^host all all 127.0.0.1/32 trust' "$hba"; then
      as_root sed -i '1i host all all 127.0.0.1/32 trust' "$hba"
      as_root pg_ctlcluster --skip-systemctl-redirect "$cluster" main reload
    fi
  fi
fi
log "ready"
