#!/usr/bin/env bash
# Set up (or update) the virtualenv with the test extra and run the whole test suite.
# Usage: scripts/test.sh [pytest args...]     e.g. scripts/test.sh -m "not slow" -x
# Before pytest: ruff check, ruff format --check and mypy (skipped with MONOQUANT_SKIP_LINT=1).
set -euo pipefail
EXTRAS="[test]"
# shellcheck source=scripts/_venv.sh
. "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
cd "$ROOT"
# lint, format and type checks first (CI runs this script); MONOQUANT_SKIP_LINT=1 skips them
# while iterating on a change
if [ "${MONOQUANT_SKIP_LINT:-0}" != "1" ]; then
    LINTED=(monoquant tests tests_vllm scripts)
    echo "monoquant: ruff check" >&2
    python -m ruff check "${LINTED[@]}"
    echo "monoquant: ruff format --check" >&2
    python -m ruff format --check "${LINTED[@]}"
    echo "monoquant: mypy monoquant" >&2
    python -m mypy monoquant
fi
python -m pytest "$@"
