"""Where a benchmark writes its JSON when --out is not given."""

import os
from pathlib import Path


def default_result_path(filename: str) -> Path:
    """$OUT/filename on the GPU machine (the folder its files come back from), else bench/results/filename."""
    if os.environ.get("OUT"):
        return Path(os.environ["OUT"]) / filename
    return Path(__file__).resolve().parent / "results" / filename
