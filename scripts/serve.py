#!/usr/bin/env python
"""Runs `dynaexq_jax.cli.serve` (its docstring, or `--help`, says what it does)."""

import sys

from dynaexq_jax.cli.serve import main

if __name__ == "__main__":
    sys.exit(main())
