"""pytest-benchmark suites (not part of `pytest` in tests/; run `pytest benchmarks/`)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
