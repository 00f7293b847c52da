#!/usr/bin/env bash
# The whole test suite on CPU with 8 fake devices: `bash launch/test.sh [pytest args]`.
# Sets up .venv from requirements.txt on a fresh machine first. Runs two pytest workers, each
# taking whole files (module fixtures are built once); `-n 0` runs in one process.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/launch/setup.sh"
cd "$ROOT"
export XLA_FLAGS="--xla_force_host_platform_device_count=8" JAX_PLATFORMS=cpu
exec .venv/bin/python -m pytest -q -n 2 --dist loadfile "$@"
