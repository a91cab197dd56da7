#!/usr/bin/env bash
# The project's test command: creates (or reuses) ./.venv, installs the package with its extras, runs pytest.
# Usage: ./tests/run.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/venv.sh
export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=8"
python -m pytest -q --durations=25 tests "$@"    # the 25 slowest tests are listed: keep the suite < 15 min
