"""What the thin scripts share: user errors become one clear line and exit code 2, not a traceback."""

from __future__ import annotations

import logging
import os
import sys
from typing import Callable

from .errors import USER_ERRORS, TrainingDiverged  # noqa: F401 - the core's errors, re-exported for callers


def quiet_transformers() -> None:
    """transformers' per-load reports and weight-loading bars drown the training log; keep its errors only."""
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def run_cli(main: Callable[[], object]) -> int:
    """Run ``main``; print ``error: ...`` for bad input (set ``SIMCSE_FLAT_DEBUG=1`` for the traceback)."""
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    quiet_transformers()
    import datasets  # noqa: F401 - its import installs its handler, as transformers' does huggingface_hub's

    for name in ("huggingface_hub", "datasets"):  # they print through their own handler: not twice
        logging.getLogger(name).propagate = not logging.getLogger(name).handlers
    try:
        main()
    except USER_ERRORS as err:
        if os.environ.get("SIMCSE_FLAT_DEBUG"):
            raise
        if int(os.environ.get("RANK", "0")) == 0:  # under accelerate launch every process stops with the same error
            print(f"error: {err}", file=sys.stderr)
        return 2
    return 0
