"""`make bench`: every benchmark in bench/, one after another, tables on stdout."""

import runpy
import sys
from pathlib import Path

here = Path(__file__).parent
sys.path.insert(0, str(here))
for script in sorted(here.glob("bench_*.py")):  # gpu_checks.py needs a GPU: run it alone
    print(f"\n## {script.stem}\n", flush=True)
    runpy.run_path(str(script), run_name="__main__")
