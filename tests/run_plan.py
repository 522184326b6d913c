"""Several pretraining runs in one launch: `torchrun ... tests/run_plan.py PLAN.json` (or plain
`python`), each run a {"argv": [pretrain flags], "out": dir, "resume": bool}. One process
group serves them all, with a new device mesh per run, so the parallel tests pay torch's
start-up and the group's rendezvous once instead of once per layout."""

import json
import sys
from pathlib import Path

from scratchlm.config import Config, load_config, resolve_recipe
from scratchlm.parallel import barrier, teardown
from scratchlm.train.pretrain import run_pretraining

try:
    for run in json.loads(Path(sys.argv[1]).read_text()):
        argv = run["argv"]
        recipe = argv[argv.index("--config") + 1] if "--config" in argv else None
        overrides = [a for a in argv if a.startswith("--") and "=" in a]
        cfg = load_config(Config, resolve_recipe(recipe), overrides)
        run_pretraining(cfg, Path(run["out"]), resume=run.get("resume", False), progress=False)
        barrier()
finally:
    teardown()
