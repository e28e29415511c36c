"""Executors in-process, without Kafka: their output goes to a list through a LogStream."""

from __future__ import annotations

import http.server
import os
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from consumers.executors import (
    HttpExecutor,
    Outcome,
    PythonExecutor,
    RunContext,
    ShellExecutor,
    group_members,
)
from consumers.logstream import LogStream
from schemas.events import ExecutorSpec, HttpSpec, LogChunk, PythonSpec, RunReady

RUN = RunReady(user_id="u", job_id="j", run_id="j@1", attempt=1, name="n", nominal_ms=1, queue="default",
               priority="normal", executor=ExecutorSpec.of_shell(["true"]))


class Attempt:
    def __init__(self, timeout: float | None = None) -> None:
        self.chunks: list[LogChunk] = []
        self.ticks = 0
        self.log = LogStream(RUN, self.chunks.append)
        self.ctx = RunContext(log=self.log, timeout=timeout, on_tick=self._tick)

    def _tick(self) -> None:
        self.ticks += 1

    def text(self, stream: str) -> str:
        self.log.flush()
        return "".join(c.data for c in self.chunks if c.stream == stream)


def sh(script: str, **kw: Any) -> ExecutorSpec:
    return ExecutorSpec.of_shell(["sh", "-c", script], **kw)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


# --- shell -----------------------------------------------------------------------------------


def test_shell_success_with_env_and_cwd(tmp_path: Path) -> None:
    a = Attempt()
    out = ShellExecutor().execute(sh('echo "$GREETING from $(pwd)"; echo warn >&2', env={"GREETING": "hi"},
                                     cwd=str(tmp_path)), a.ctx)
    assert out == Outcome(outcome="succeeded", exit_code=0)
    assert a.text("stdout") == f"hi from {tmp_path}\n"
    assert a.text("stderr") == "warn\n"


def test_shell_env_is_merged_over_the_workers_and_the_attempts() -> None:
    a = Attempt()
    a.ctx.env.update({"JOBSCHED_RUN_ID": "j@1", "OVER": "attempt"})
    ShellExecutor(base_env={"PATH": os.environ["PATH"], "KEEP": "kept", "OVER": "old"}).execute(
        sh('echo "$KEEP $OVER $JOBSCHED_RUN_ID"', env={"OVER": "new"}), a.ctx)
    assert a.text("stdout") == "kept new j@1\n"


def test_shell_failure_reports_exit_code() -> None:
    a = Attempt()
    assert ShellExecutor().execute(sh("exit 7"), a.ctx) == Outcome(outcome="failed", exit_code=7, reason="exit code 7")


def test_shell_killed_by_a_signal() -> None:
    a = Attempt()
    out = ShellExecutor().execute(sh("kill -9 $$"), a.ctx)
    assert out == Outcome(outcome="failed", exit_code=137, reason="killed by SIGKILL")


def test_shell_program_that_does_not_exist() -> None:
    a = Attempt()
    out = ShellExecutor().execute(ExecutorSpec.of_shell(["/nonexistent/prog"]), a.ctx)
    assert out.outcome == "failed" and out.exit_code == 127 and "cannot start '/nonexistent/prog'" in (out.reason or "")


def test_shell_timeout_kills_the_process_group() -> None:
    a = Attempt(timeout=0.5)
    t0 = time.monotonic()
    out = ShellExecutor().execute(sh("echo $$; sleep 60 & echo $!; sleep 60"), a.ctx)
    assert time.monotonic() - t0 < 3
    assert out == Outcome(outcome="timed_out", exit_code=143, reason="timed out after 0.5s")
    pgid, bg = map(int, a.text("stdout").split())
    assert group_members(pgid) == [] and not _alive(bg)


def test_shell_escalates_to_sigkill_after_the_grace_period() -> None:
    a = Attempt(timeout=0.3)
    t0 = time.monotonic()
    out = ShellExecutor(kill_grace=0.5).execute(sh("trap '' TERM; echo $$; sleep 60 & wait"), a.ctx)
    took = time.monotonic() - t0
    assert out.outcome == "timed_out" and out.exit_code == 137
    assert 0.7 < took < 4
    assert group_members(int(a.text("stdout").split()[0])) == []


def test_shell_cancel_stops_the_attempt() -> None:
    a = Attempt()
    threading.Timer(0.3, a.ctx.request_stop, args=("cancel", "user asked")).start()
    out = ShellExecutor().execute(sh("sleep 60"), a.ctx)
    assert out == Outcome(outcome="cancelled", exit_code=143, reason="user asked")
    assert a.ticks > 0


def test_leftover_background_processes_are_killed_when_the_main_process_exits() -> None:
    a = Attempt()
    t0 = time.monotonic()
    out = ShellExecutor().execute(sh("sleep 60 >/dev/null 2>&1 & echo $!"), a.ctx)
    assert out.outcome == "succeeded" and time.monotonic() - t0 < 3
    assert not _alive(int(a.text("stdout").split()[0]))
    assert "[killed 1 leftover process(es)" in a.text("system")


def test_output_is_drained_beyond_the_cap_so_the_child_never_blocks() -> None:
    chunks: list[LogChunk] = []
    log = LogStream(RUN, chunks.append, cap_bytes=1000)
    ctx = RunContext(log=log, timeout=20)
    out = ShellExecutor().execute(sh("head -c 5000000 /dev/zero; echo end"), ctx)
    log.close()
    assert out.outcome == "succeeded"
    assert log.kept_bytes == 1000 and log.discarded_bytes == 5000004 - 1000


# --- http ------------------------------------------------------------------------------------


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        if self.path == "/slow":
            time.sleep(2)
        status = {"/created": 201, "/teapot": 418, "/redirect-file": 302}.get(self.path, 200)
        body = b"x" * 100 if self.path == "/big" else f"{self.command} {self.path}".encode()
        self.send_response(status)
        if status == 302:
            self.send_header("Location", "file:///etc/passwd")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def server() -> Iterator[str]:
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.daemon_threads = True
    t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()
    t.join(5)


def http_spec(url: str, **kw: Any) -> ExecutorSpec:
    return ExecutorSpec(kind="http", http=HttpSpec(url=url, **kw))


def test_http_any_2xx_is_success(server: str) -> None:
    a = Attempt()
    assert HttpExecutor().execute(http_spec(server + "/created"), a.ctx).outcome == "succeeded"
    assert a.text("system") == "HTTP 201 Created\n"
    assert a.text("stdout") == "GET /created"


def test_http_success_codes(server: str) -> None:
    a = Attempt()
    assert HttpExecutor().execute(http_spec(server + "/teapot", success_codes=[418]), a.ctx).outcome == "succeeded"
    out = HttpExecutor().execute(http_spec(server + "/created", success_codes=[200]), Attempt().ctx)
    assert out == Outcome(outcome="failed", reason="HTTP 201 Created")


def test_http_body_in_the_log_is_bounded(server: str) -> None:
    a = Attempt()
    HttpExecutor(body_log_bytes=10).execute(http_spec(server + "/big"), a.ctx)
    assert a.text("stdout") == "x" * 10
    assert "[response body truncated at 10 bytes]" in a.text("system")


def test_http_timeout(server: str) -> None:
    a = Attempt(timeout=0.3)
    t0 = time.monotonic()
    out = HttpExecutor().execute(http_spec(server + "/slow"), a.ctx)
    assert out.outcome == "timed_out" and time.monotonic() - t0 < 1.5


def test_http_connection_refused() -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = HttpExecutor().execute(http_spec(f"http://127.0.0.1:{port}/"), Attempt().ctx)
    assert out.outcome == "failed" and "request failed" in (out.reason or "")


def test_http_refuses_other_schemes_even_through_redirects(server: str) -> None:
    ex = HttpExecutor()
    assert "only fetches http:// and https://" in (ex.check(http_spec("file:///etc/passwd")) or "")
    out = ex.execute(http_spec(server + "/redirect-file"), Attempt().ctx)
    assert out.outcome == "failed"


# --- python ----------------------------------------------------------------------------------


def py(target: str, kwargs_json: str = "{}") -> ExecutorSpec:
    return ExecutorSpec(kind="python", python=PythonSpec(target=target, kwargs_json=kwargs_json))


def test_python_return_value_is_logged() -> None:
    a = Attempt()
    assert PythonExecutor().execute(py("tests.helpers.pyjobs:add", '{"a": 1, "b": 2}'), a.ctx).outcome == "succeeded"
    assert a.text("system") == 'returned: {"sum": 3}\n'
    b = Attempt()
    PythonExecutor().execute(py("tests.helpers.pyjobs:Tasks.shout", '{"word": "hey"}'), b.ctx)
    assert b.text("system") == 'returned: "HEY"\n'


def test_python_exception_fails_with_its_message() -> None:
    a = Attempt()
    out = PythonExecutor().execute(py("tests.helpers.pyjobs:boom", '{"message": "no way"}'), a.ctx)
    assert out == Outcome(outcome="failed", reason="RuntimeError: no way")
    assert "Traceback" in a.text("stderr")


@pytest.mark.parametrize(
    ("target", "kwargs_json", "reason"),
    [
        ("tests.helpers.pyjobs", "{}", "is not 'package.module:function'"),
        ("tests.helpers.nope:f", "{}", "cannot load 'tests.helpers.nope:f': ModuleNotFoundError"),
        ("tests.helpers.pyjobs:missing", "{}", "AttributeError"),
        ("tests.helpers.pyjobs:add", "[1]", "kwargs_json must be a JSON object"),
        ("tests.helpers.pyjobs:add", "{", "kwargs_json is not JSON"),
        ("tests.helpers.pyjobs:add", '{"c": 1}', "TypeError"),
    ],
)
def test_python_bad_targets_fail_clearly(target: str, kwargs_json: str, reason: str) -> None:
    out = PythonExecutor().execute(py(target, kwargs_json), Attempt().ctx)
    assert out.outcome == "failed" and reason in (out.reason or "")


def test_python_module_allow_list() -> None:
    ex = PythonExecutor(allowed_modules=("tests.helpers",))
    assert ex.check(py("tests.helpers.pyjobs:add")) is None
    assert "'os' is not in this worker's allowed modules" in (ex.check(py("os:getcwd")) or "")
    assert ex.check(py("tests.helpersevil:f")) is not None  # a prefix of the name is not a package prefix


def test_python_runs_of_one_target_reuse_its_checks_and_function_with_their_own_arguments() -> None:
    ex = PythonExecutor(allowed_modules=("tests.helpers",))
    outs = []
    for a, b in ((1, 2), (5, 5)):
        att = Attempt()
        assert ex.execute(py("tests.helpers.pyjobs:add", f'{{"a": {a}, "b": {b}}}'), att.ctx).outcome == "succeeded"
        outs.append(att.text("system"))
    assert outs == ['returned: {"sum": 3}\n', 'returned: {"sum": 10}\n']
    # A refused target stays refused, run after run, and is never loaded.
    for _ in range(2):
        out = ex.execute(py("os:getcwd"), Attempt().ctx)
        assert out.outcome == "failed" and "'os' is not in this worker's allowed modules" in (out.reason or "")
    # A target that failed to load is tried again (the module may be deployed since).
    for _ in range(2):
        out = ex.execute(py("tests.helpers.nope:f"), Attempt().ctx)
        assert "ModuleNotFoundError" in (out.reason or "")
    assert set(ex._loaded) == {"tests.helpers.pyjobs:add"}


def test_python_timeout_ends_the_attempt() -> None:
    a = Attempt(timeout=0.2)
    t0 = time.monotonic()
    out = PythonExecutor().execute(py("tests.helpers.pyjobs:nap", '{"seconds": 1}'), a.ctx)
    assert out.outcome == "timed_out" and time.monotonic() - t0 < 0.8
    assert "could not be stopped" in a.text("system")


def test_wake_ends_an_executor_wait_before_its_tick() -> None:
    # A helper thread that finishes wakes the executor at once instead of at its next
    # tick: without it a no-op Python job held its worker slot for a whole tick.
    ctx = RunContext(log=LogStream(RUN, lambda c: None, cap_bytes=1000))
    returned = threading.Event()

    def waiter() -> None:
        ctx.wait(600.0)
        returned.set()

    t = threading.Thread(target=waiter)
    t.start()
    assert not returned.wait(0.2)  # it really is waiting
    ctx.wake()
    assert returned.wait(30)  # woke long before its 600 s
    t.join()
    assert ctx.ending() is None  # a wake is not a stop


def test_background_calls_reuse_threads_and_a_stuck_call_blocks_no_other() -> None:
    from consumers.executors import _Background, _Callers

    callers = _Callers(idle_s=0.5)
    release = threading.Event()
    seen: list[threading.Thread] = []

    def call(fn: Any) -> _Background:
        return _Background(fn, "t", callers=callers)

    stuck = call(lambda: release.wait(10))
    quick = [call(lambda: seen.append(threading.current_thread())) for _ in range(20)]
    deadline = time.monotonic() + 5
    while not all(b.finished for b in quick):
        assert time.monotonic() < deadline, "calls waited behind a stuck one"
        time.sleep(0.01)
    assert not stuck.finished
    assert len(set(seen)) < 20  # threads were reused, not one per call
    release.set()
    deadline = time.monotonic() + 5
    while not stuck.finished:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    deadline = time.monotonic() + 5
    while any(t.is_alive() for t in set(seen)):  # idle threads leave after idle_s
        assert time.monotonic() < deadline, "idle caller threads did not exit"
        time.sleep(0.05)
