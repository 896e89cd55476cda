"""The benchmark scripts import their siblings (results_md) as top-level modules, as `python benchmarks/X.py` does."""

import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
if str(BENCHMARKS) not in sys.path:
    sys.path.insert(0, str(BENCHMARKS))
