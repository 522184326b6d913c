"""Where every benchmark leaves its figures: bench/out/NAME.json (not committed)."""

import json
from pathlib import Path


def save(name: str, results) -> Path:
    out = Path(__file__).parent / "out"
    out.mkdir(exist_ok=True)
    path = out / f"{name}.json"
    path.write_text(json.dumps(results, indent=2, default=str))
    return path
