"""Shared test settings: where the benchmark data and the bundled tokenizer live."""
import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("EDGEBUILD_DATA_DIR", REPO.parent / "shared" / "data"))
TOKENIZER_DIR = REPO / "build" / "assets" / "smollm2-tokenizer"
