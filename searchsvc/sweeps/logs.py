"""One line per failure in a sweep's log: Tune's tracebacks (a store outage gives dozens) shortened while it runs."""

from __future__ import annotations

import contextlib
import logging
from typing import Iterator

from core.errors import first_line

# Tune logs a failed trial, and each failed save or load of its experiment state on the store, with a traceback
# (a store outage gives dozens). The run's own one-line error says what happened: these loggers' lines stay
# one line each while the sweep runs; a trial's traceback is in its error.txt of the experiment (and on
# stderr with --debug).
QUIET_LOGGERS = ("ray.tune.execution.tune_controller", "ray.tune.execution.experiment_state",
                 "ray.tune.logger.logger", "ray.train._internal.storage", "ray.train._internal.syncer")
TRACEBACK = "Traceback (most recent call last):"


class NoTraceback(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if record.exc_info or TRACEBACK in message:
            cause = first_line(record.exc_info[1]) if record.exc_info and record.exc_info[1] else \
                message.rstrip().splitlines()[-1]
            head = message.split(TRACEBACK)[0].strip().splitlines()  # RLlib's message holds the error's many lines
            record.msg = f"{head[0] if head else ''} {cause}"
            record.args, record.exc_info, record.exc_text = (), None, None
        return True


@contextlib.contextmanager
def one_line_logs(names: tuple[str, ...] = QUIET_LOGGERS) -> Iterator[None]:
    """While the block runs, the loggers `names` log one line per failure (all of it with --debug)."""
    loggers = [] if logging.getLogger().isEnabledFor(logging.DEBUG) else [logging.getLogger(n) for n in names]
    only_line = NoTraceback()
    for logger in loggers:
        logger.addFilter(only_line)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(only_line)
