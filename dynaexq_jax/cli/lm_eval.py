"""lm-evaluation-harness's own command line, with this project's model registered as `dynaexq`.

    python scripts/lm_eval.py --model dynaexq \\
        --model_args pretrained=checkpoints/tiny-qwen3-moe,policy=dynaexq,budget=20GB,dtype=bfloat16 \\
        --tasks TASKS [--include_path DIR] [--batch_size N] [--output_path DIR] ...

Every argument is lm-eval's (`pip install -e ".[eval]"`); the model arguments are listed in
dynaexq_jax/eval/lm_eval.py. JAX's compilation cache is on as for generate.py
(DYNAEXQ_COMPILE_CACHE=0 turns it off).
"""

from __future__ import annotations

import sys

from dynaexq_jax.errors import UserError
from dynaexq_jax.launch.flags import one_line_errors


def main() -> int:
    try:
        from lm_eval.__main__ import cli_evaluate
    except ImportError:
        print('error: lm-eval is not installed; pip install -e ".[eval]"', file=sys.stderr)
        return 2
    from dynaexq_jax.eval import lm_eval as _registers_dynaexq  # noqa: F401
    from dynaexq_jax.runtime import compile_cache, host_memory

    host_memory.reuse_freed_memory()
    compile_cache.enable()
    try:
        with one_line_errors():  # lm-eval's own parser refuses a bad argument in one line too
            cli_evaluate()
    except (UserError, ValueError) as e:  # lm-eval refuses what it is asked (no tasks, a bad task) by ValueError
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    return 0
