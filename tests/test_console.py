"""The console a person reads while a flow runs: Prefect's line per finished task run is
gone, failures and the flow's own lines stay, and per-point lines give way to a bar on a
terminal."""

import io
import logging

import pytest
from prefect import flow, get_run_logger, task

from flows import console


@task(task_run_name="square {x}")
def square(x: int) -> int:
    return x * x


@task(task_run_name="fail {x}", retries=0)
def fail(x: int) -> int:
    raise ValueError(f"no {x}")


@flow
def squares(n: int, failing: bool = False) -> int:
    logger = get_run_logger()
    total = sum(square(i) for i in range(n))
    logger.info("grid 1/1: total %d", total, extra={console.PROGRESS_LINE: True})
    logger.info("select: total %d", total)
    if failing:
        fail(7)
    return total


@pytest.fixture
def screen():
    """A Prefect console handler on the root logger writing to a buffer (pytest holds the
    process's stderr); read it with ``.getvalue()``."""
    from prefect.logging.handlers import PrefectConsoleHandler

    buffer = io.StringIO()
    handler = PrefectConsoleHandler(stream=buffer)
    handler.setFormatter(logging.getLogger().handlers[0].formatter)
    logging.getLogger().addHandler(handler)
    yield buffer
    logging.getLogger().removeHandler(handler)


@pytest.fixture
def thinned(screen):
    console.quiet_console()
    yield screen
    for handler in logging.getLogger().handlers:
        handler.removeFilter(console._FILTER)


def test_console_drops_completed_task_lines_and_keeps_the_flows(prefect_harness, thinned):
    assert squares(4) == 14
    err = thinned.getvalue()
    assert "Task run 'square" not in err
    assert "select: total 14" in err
    assert "grid 1/1: total 14" in err  # not a terminal: the line stands in for the bar
    assert "Flow run" in err and "Finished in state Completed()" in err  # the flow's own end


def test_console_keeps_a_failed_task_run(prefect_harness, thinned):
    with pytest.raises(ValueError, match="no 7"):
        squares(2, failing=True)
    err = thinned.getvalue()
    assert "Task run 'fail 7'" in err and "Failed" in err
    assert "Task run 'square" not in err


def test_progress_lines_give_way_to_the_bar_on_a_terminal(prefect_harness, thinned, monkeypatch):
    monkeypatch.setattr(console, "bar_shown", lambda: True)
    squares(3)
    err = thinned.getvalue()
    assert "grid 1/1" not in err
    assert "select: total 5" in err


def test_without_the_filter_prefect_prints_every_task_run(prefect_harness, screen):
    squares(2)
    assert "Task run 'square 1' - Finished in state Completed()" in screen.getvalue()


def test_a_retried_event_flush_of_the_ephemeral_server_is_not_shown_but_a_drop_is(thinned):
    import sqlite3

    recorder = logging.getLogger("prefect.server.services.task_run_recorder")
    try:
        raise sqlite3.OperationalError("database is locked")
    except sqlite3.OperationalError:
        recorder.error("Error flushing 1 events (1 to retry, 0 dropped)", exc_info=True)
        recorder.error("Error flushing 3 events (1 to retry, 2 dropped)", exc_info=True)
    recorder.error("Dropping event e1 after 4 failed attempts")
    shown = thinned.getvalue()
    assert "1 to retry, 0 dropped" not in shown
    assert "2 dropped" in shown and "database is locked" in shown
    assert "Dropping event e1" in shown


def _run_with_no_api(script: str, tmp_path, unset=()) -> tuple:
    """``script`` in a new Python process with no Prefect API configured (and none of the
    environment's ``PREFECT_`` settings nor ``unset``): the finished process, and the JSON
    its last line printed."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_") and k not in unset}
    env.update({"PREFECT_HOME": str(tmp_path / "prefect"), "PYTHONPATH": str(root)})
    ran = subprocess.run(
        [sys.executable, "-c", script],
        env=env,
        cwd=root,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert ran.returncode == 0, ran.stderr[-3000:]
    return ran, json.loads(ran.stdout.strip().splitlines()[-1])


_EPHEMERAL_RUN = """
import json, sys
from flows.console import quiet_servers
quiet_servers()
from prefect import flow
from prefect.server.api.server import SubprocessASGIServer

@flow
def hello():
    return 1

hello()
servers = [s for s in SubprocessASGIServer._instances.values() if s.running]
import httpx
settings = httpx.get(servers[0].api_url + "/admin/settings", timeout=30).json()
from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS as WAIT
print(json.dumps({"analytics": settings["server"]["analytics_enabled"],
                  "timeout": settings["server"]["ephemeral"]["startup_timeout_seconds"],
                  "client_wait": WAIT.value()}))
"""


def test_an_ephemeral_server_that_mergeflow_starts_runs_no_analytics(tmp_path):
    """A flow run with no Prefect API configured (as ``mergeflow run`` and ``make demo``
    do it): the ephemeral server Prefect starts for it reports analytics (its telemetry
    service) off and the raised startup timeout, read from its own settings endpoint, and
    the process that started it waits that long too."""
    ran, found = _run_with_no_api(_EPHEMERAL_RUN, tmp_path, unset=("DO_NOT_TRACK",))
    # the server's own settings, and how long this process waits for it to start
    assert found == {"analytics": False, "timeout": 180, "client_wait": 180}
    assert "Traceback" not in ran.stderr and "telemetry" not in ran.stderr.lower()


_EARLY_START = """
import json
from flows.console import quiet_servers, start_ephemeral_api
quiet_servers()
starting = start_ephemeral_api()
# the API comes up while this thread goes on (the demo builds its zoo here)
busy_while_starting = starting.is_alive()
starting.join()
from prefect import flow
from prefect.server.api.server import SubprocessASGIServer
(server,) = [s for s in SubprocessASGIServer._instances.values() if s.running]
first = server.server_process.pid

@flow
def hello():
    from prefect.client.orchestration import get_client
    with get_client(sync_client=True) as client:
        return client.api_url

used = str(hello())
running = [s for s in SubprocessASGIServer._instances.values() if s.running]
print(json.dumps({"busy": busy_while_starting, "servers": len(running),
                  "same": running[0].server_process.pid == first,
                  "used": used.rstrip("/") == server.api_url}))
"""


def test_the_ephemeral_api_started_early_is_the_one_the_flow_uses(tmp_path):
    """`make demo` starts the ephemeral API in the background before it builds the zoo:
    the caller goes on while it starts, and the flow run afterwards uses that server (one
    server process, the same one) instead of starting another."""
    _, found = _run_with_no_api(_EARLY_START, tmp_path)
    assert found == {"busy": True, "servers": 1, "same": True, "used": True}


def test_no_ephemeral_api_is_started_where_an_api_is_configured():
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import PREFECT_API_URL, temporary_settings

    before = dict(SubprocessASGIServer._instances)
    with temporary_settings({PREFECT_API_URL: "http://127.0.0.1:9/api"}):
        assert console.start_ephemeral_api() is None
    assert SubprocessASGIServer._instances == before
