"""Logging set-up shared by the workflow's rule scripts.

Each rule logs to its own file under ``{outdir}/logs/``; long loops report
progress through the same logger.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import warnings

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup_logging(log_path=None, *, level=logging.INFO) -> logging.Logger:
    """Send the ``diffim`` loggers and Python warnings to ``log_path`` and stderr."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handlers = [logging.StreamHandler(sys.stderr)]
    if log_path:
        os.makedirs(os.path.dirname(os.path.abspath(log_path)), exist_ok=True)
        handlers.append(logging.FileHandler(log_path, mode="w"))
    for handler in handlers:
        handler.setFormatter(logging.Formatter(FORMAT))
        root.addHandler(handler)
    root.setLevel(level)
    logging.captureWarnings(True)
    warnings.simplefilter("default")
    return logging.getLogger("diffim")


class Progress:
    """Log ``done/total`` at most every ``every_s`` seconds in a long loop."""

    def __init__(self, total: int, what: str, logger: logging.Logger, every_s: float = 10.0):
        self.total, self.what, self.logger, self.every_s = total, what, logger, every_s
        self.start = self.last = time.monotonic()

    def update(self, done: int) -> None:
        now = time.monotonic()
        if now - self.last >= self.every_s or done == self.total:
            self.last = now
            self.logger.info("%s: %d/%d (%.1f s)", self.what, done, self.total, now - self.start)
