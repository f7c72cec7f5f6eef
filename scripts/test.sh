#!/usr/bin/env bash
# Set up (or update) the virtualenv with the test extra and run the whole test suite.
# Usage: scripts/test.sh [pytest args...]     e.g. scripts/test.sh -m "not slow" -x
set -euo pipefail
EXTRAS="[test]"
# shellcheck source=scripts/_venv.sh
. "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
cd "$ROOT"
python -m pytest "$@"
