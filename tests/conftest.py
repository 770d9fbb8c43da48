import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# ../shared beside the checkout (developer machines and CI); overridable for other layouts.
SHARED = Path(os.environ.get("INTERNVL_SHARED_DIR", REPO.parent / "shared"))
REFERENCE = SHARED / "reference"

if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    if not REFERENCE.is_dir():
        pytest.fail(f"reference data not found at {REFERENCE}; set INTERNVL_SHARED_DIR to the shared/ folder")
    return REFERENCE
