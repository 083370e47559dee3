#!/usr/bin/env bash
# dinor1 cluster local up [options]: see cluster/README.md ("Local cluster") and
# `dinor1 cluster local up --help`. Uses the project's venv when it exists.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
DINOR1="$ROOT/.venv/bin/dinor1"
[ -x "$DINOR1" ] || DINOR1=dinor1
exec "$DINOR1" cluster local up "$@"
