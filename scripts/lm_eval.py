#!/usr/bin/env python
"""Runs `dynaexq_jax.cli.lm_eval`: lm-evaluation-harness's command line with `--model dynaexq`."""

import sys
from pathlib import Path

# This file's folder leads sys.path and the file bears lm-eval's name: without the folder,
# `import lm_eval` finds the harness rather than this file.
HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]

from dynaexq_jax.cli.lm_eval import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
