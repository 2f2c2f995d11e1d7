"""What a person running a flow in a terminal reads: the steps by name, one bar over the
grid, and not Prefect's line per finished task run (the Prefect UI keeps every state and
every log line; only the console is thinned).

:func:`quiet_console` and :func:`quiet_servers` are called by ``make demo`` and ``mergeflow
run``; a deployment's worker logs are left as Prefect writes them.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import threading

from tqdm.auto import tqdm

PROGRESS_LINE = "mergeflow_progress_line"
"""Set (``extra={PROGRESS_LINE: True}``) on a log record that a console bar stands for."""


def bar_shown() -> bool:
    """A bar only on a terminal: in a file or a worker's log it would be a line per update."""
    return sys.stderr.isatty()


# Prefect's ephemeral server retries a batch of task-run events that SQLite refused under
# load ("database is locked") and logs each refusal with its traceback; an event it gives up
# on is logged apart ("Dropping event ..."), and that still shows
_RETRIED_FLUSH = re.compile(r"Error flushing \d+ events \(\d+ to retry, 0 dropped\)")


class _ThinConsole(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "prefect.server.services.task_run_recorder" and _RETRIED_FLUSH.match(
            record.getMessage()
        ):
            return False
        if (
            record.name == "prefect.task_runs"
            and record.levelno <= logging.INFO
            and record.getMessage().startswith("Finished in state")
        ):
            return False  # a failed or crashed task run is logged at ERROR and still shows
        return not (getattr(record, PROGRESS_LINE, False) and bar_shown())


_FILTER = _ThinConsole()


# what an ephemeral Prefect API that mergeflow starts is given: no analytics or telemetry
# (its telemetry service runs despite DO_NOT_TRACK, and under load ends in a SQLite
# "database is locked" traceback, or fails to resolve its host offline), and time to start
# on a loaded 2-core machine
EPHEMERAL_SERVER_SETTINGS = {
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
}


def quiet_servers() -> None:
    """When no Prefect API is configured (a run on the ephemeral API that Prefect starts
    for it), give that server :data:`EPHEMERAL_SERVER_SETTINGS` where the environment
    does not set them. A configured API (a real server) is left alone."""
    from prefect.context import refresh_global_settings_context
    from prefect.settings import get_current_settings

    if get_current_settings().api.url:
        return
    for name, value in EPHEMERAL_SERVER_SETTINGS.items():
        os.environ.setdefault(name, value)
    # The server process reads the environment, but this process waits for it with the
    # settings Prefect read when it was imported: without a refresh that wait stays at 20 s
    # and a slow start fails ("Timed out while attempting to connect").
    refresh_global_settings_context()


def start_ephemeral_api() -> threading.Thread | None:
    """Start the ephemeral Prefect API that a flow run would start (10–25 s on 2 cores) in
    the background, so that it comes up while other work (the demo's zoo) runs; join the
    thread before the first flow run, which then finds it up. None, starting nothing, when a
    Prefect API is configured or ephemeral servers are off."""
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import get_current_settings

    settings = get_current_settings()
    if settings.api.url or not settings.server.ephemeral.enabled:
        return None
    starting = threading.Thread(
        target=SubprocessASGIServer().start, name="start Prefect's ephemeral API", daemon=True
    )
    starting.start()
    return starting


def quiet_console() -> None:
    """Thin the console handlers of the root logger (Prefect's console handler): no line
    per completed task run, no per-point line while a bar shows the grid, no traceback for
    a batch of events the ephemeral server retries. Idempotent."""
    # Prefect sets up logging (its console handler on the root logger) when its flow API is
    # first loaded; `import prefect` alone does not. Before it, the first root-level
    # `logging.info` of a library (open_clip's) installs a plain handler no filter is on.
    from prefect import flow  # noqa: F401

    for handler in logging.getLogger().handlers:
        if _FILTER not in handler.filters:
            handler.addFilter(_FILTER)


def grid_bar(total: int, desc: str = "score grid"):
    """A tqdm bar over ``total`` grid points, on stderr when it is a terminal."""
    return tqdm(total=total, desc=desc, unit="point", file=sys.stderr, disable=not bar_shown())


__all__ = [
    "PROGRESS_LINE",
    "bar_shown",
    "grid_bar",
    "quiet_console",
    "quiet_servers",
    "start_ephemeral_api",
]
