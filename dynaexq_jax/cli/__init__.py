"""The commands, each a `main(argv)` over `dynaexq_jax.launch` (scripts/<name>.py runs it):

    generate   text from prompts, or a conversation on stdin
    serve      the OpenAI-compatible server
    eval       perplexity, multiple-choice and exact-match metrics per policy and budget
    bench      residency policies side by side: throughput, memory, quality
    lm_eval    lm-evaluation-harness with this project's model registered

Each adds the flag groups it runs with from `launch.options`, adds only its own flags, and
does its own job; an error a user can fix is one `error:` line on stderr and exit status 2.
"""

from __future__ import annotations

import functools
import sys

from dynaexq_jax.errors import UserError


def show_warning(message, category, filename, lineno, file=None, line=None):
    """Warnings (an unusable cache, say) as one line, like errors (`warnings.showwarning`)."""
    print(f"warning: {message}", file=sys.stderr)


def refusals_as_errors(main):
    """Decorate a command's `main(argv)`: a refusal the user can fix (`UserError`) is one
    `error:` line on stderr and exit status 2, never a traceback."""
    @functools.wraps(main)
    def run(argv=None):
        try:
            return main(argv)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    return run
