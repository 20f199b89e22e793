#!/usr/bin/env bash
# Set up everything the tests need (venv, DCMTK, Orthanc, PostgreSQL) and run lint, types, tests.
# Extra arguments go to pytest (e.g. scripts/test.sh -k qr). Long runs: scripts/test.sh -m slow
# Tests run on one worker per core (pytest-xdist); CONSENTGATE_TEST_WORKERS=0 runs them in
# this process, one after the other.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --test
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
exec .venv/bin/python -m pytest -n "${CONSENTGATE_TEST_WORKERS:-auto}" "$@"
