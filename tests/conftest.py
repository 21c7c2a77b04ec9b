"""Shared test helpers.

What the suite needs from its environment is present in CI: `../shared/reference` beside the
clone (the team's reference data, not part of this repository) and Debian's chromium (installed by
`make test`). A missing piece fails the tests that need it instead of skipping them, so an
incomplete set-up cannot pass green. Set
ALLIANCE_TESTS_ALLOW_MISSING=1 to skip them instead (a developer machine without the reference
folder).
"""

import os
from pathlib import Path

import pytest

ALLOW_MISSING = "ALLIANCE_TESTS_ALLOW_MISSING"
REF_REMEDY = ("clone the repository beside the team's `shared` folder (CI does), so that "
              "../shared/reference exists")
# The key the importer tests make their event ids with (alliance.importers.common.event_id).
IMPORT_KEY = b"importer-tests-key-0123456789abcdef012345"


def require_present(path: Path, what: str, remedy: str = "") -> None:
    """Fail (or, with ALLIANCE_TESTS_ALLOW_MISSING=1, skip) when `path` does not exist."""
    if path.exists():
        return
    message = f"{what} is missing at {path}"
    if os.environ.get(ALLOW_MISSING) == "1":
        pytest.skip(f"{message} ({ALLOW_MISSING}=1)")
    pytest.fail(f"{message}{': ' + remedy if remedy else ''} (set {ALLOW_MISSING}=1 to skip "
                "instead)")
