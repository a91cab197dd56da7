#!/usr/bin/env bash
# The project's test command: creates (or reuses) ./.venv, installs the package with its extras, runs pytest.
# Usage: ./tests/run.sh [pytest args...]      (default 2 pytest-xdist workers; TEST_WORKERS=0: one process)
# 2 workers on a 2-core machine: most of the suite is single-threaded compiling and subprocess start-up;
# tests/conftest.py keeps each file (and the files sharing the reference run) on one worker.
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/venv.sh
# 8 CPU devices; LLVM at -O1: the suite compiles many tiny programs (-O0 compiles fastest but runs samplers 3x slower)
export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=8 --xla_backend_optimization_level=1"
python -m pytest -q -n "${TEST_WORKERS:-2}" --durations=25 tests "$@"    # the 25 slowest tests are listed: keep the suite < 15 min
