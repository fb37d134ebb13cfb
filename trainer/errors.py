"""User-facing errors: one clear line and a non-zero exit, never a traceback."""
from __future__ import annotations

import functools
import os
import sys
import time

EXIT_USER_ERROR = 2


class UserError(Exception):
    """Bad input from the user (config, data, paths). Reported as one line."""


def _is_main_rank() -> bool:
    return os.environ.get("RANK", "0") == "0"


def cli_entry(main):
    """Wrap a launch script's main(): UserError → `error: ...` on stderr and exit 2; success → exit 0.

    Only global rank 0 prints, so a 2-rank launch shows the message once."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            main(*args, **kwargs)
            if int(os.environ.get("WORLD_SIZE", "1")) > 1:
                # done (process group destroyed, wandb finished): leave without interpreter finalisation, where
                # gloo's C++ worker threads can still abort a finished run ("terminate called ..."). One process
                # exits normally (profilers and coverage tools write their data at exit).
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(0)
        except UserError as exc:
            if _is_main_rank():
                print(f"error: {exc}", file=sys.stderr, flush=True)
            else:  # the launcher kills all ranks when one exits: let rank 0 print first
                time.sleep(3)
            # os._exit: skip atexit hooks (wandb, process groups) that could hang or print tracebacks
            sys.stdout.flush()
            os._exit(EXIT_USER_ERROR)

    return wrapper
