"""`python -m scratchlm.eval ARGS` is lm-evaluation-harness's command line (`lm_eval ARGS`)
with the `scratchlm` model class registered, for lm-eval releases that do not discover models
through entry points (0.4.x):

    python -m scratchlm.eval run --model scratchlm --model_args path=runs/demo \\
        --tasks scratchlm_builtin_speaker --include_path TASKS_DIR
"""

import sys

from scratchlm.eval.harness import register


def main() -> None:
    if not register():
        print("error: lm-eval is not installed; pip install lm-eval (or make setup)",
              file=sys.stderr)
        sys.exit(2)
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
