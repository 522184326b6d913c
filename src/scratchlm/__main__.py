"""`python -m scratchlm` (and `torchrun -m scratchlm`) runs the CLI."""

import sys

from scratchlm.cli import main

sys.exit(main())
