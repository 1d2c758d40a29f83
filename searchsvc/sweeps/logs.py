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
            record.msg = f"{message.split(TRACEBACK)[0].strip()} {cause}"
            record.args, record.exc_info, record.exc_text = (), None, None
        return True


@contextlib.contextmanager
def one_line_logs() -> Iterator[None]:
    loggers = [] if logging.getLogger().isEnabledFor(logging.DEBUG) else [logging.getLogger(n) for n in QUIET_LOGGERS]
    only_line = NoTraceback()
    for logger in loggers:
        logger.addFilter(only_line)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(only_line)
