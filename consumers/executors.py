"""Executors: how a worker runs one attempt of a job.

::

    Executor (ABC)              execute(spec, ctx) -> Outcome; check(spec) -> refusal or None
    ├── ShellExecutor           a child process in its own session (process group)
    ├── HttpExecutor            one HTTP request with urllib
    └── PythonExecutor          a callable 'pkg.module:function' imported in the worker

An executor sees the attempt through a :class:`RunContext`: the :class:`LogStream` to
write output to, the attempt's deadline, and a stop flag the worker raises when the run
is cancelled or the worker shuts down.  Executors wait in short steps through
:meth:`RunContext.wait`, which also flushes due log chunks and lets the worker send
heartbeats, so a long job keeps reporting and stays stoppable.

Executors never raise for a job's failure: every end is an :class:`Outcome`
(``succeeded | failed | timed_out | cancelled``).  They know nothing about Kafka.
"""

from __future__ import annotations

import importlib
import itertools
import json
import os
import queue
import selectors
import signal
import subprocess
import threading
import time
import traceback
import urllib.error
import urllib.request
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Literal, Mapping

from consumers.logstream import LogStream
from schemas.events import ExecutorSpec

__all__ = [
    "Executor",
    "Outcome",
    "RunContext",
    "ShellExecutor",
    "HttpExecutor",
    "PythonExecutor",
    "default_executors",
    "group_members",
    "DEFAULT_KILL_GRACE",
]

#: Seconds between SIGTERM and SIGKILL of a process group.
DEFAULT_KILL_GRACE = 5.0
#: Bytes of an HTTP response body or a Python return value copied to the log.
DEFAULT_RESULT_LOG_BYTES = 64 * 1024
#: Socket timeout of an HTTP request when the job has no timeout of its own.
DEFAULT_HTTP_TIMEOUT = 300.0

StopReason = Literal["cancel", "shutdown"]
Ending = Literal["timeout", "cancel", "shutdown"]


@dataclass(frozen=True, kw_only=True, slots=True)
class Outcome:
    """How an attempt ended, as reported in ``RunFinished``."""

    outcome: str  # succeeded | failed | timed_out | cancelled
    exit_code: int | None = None
    reason: str | None = None


class RunContext:
    """What an executor sees of the attempt it runs."""

    def __init__(
        self,
        *,
        log: LogStream,
        timeout: float | None = None,
        on_tick: Callable[[], None] | None = None,
        env: Mapping[str, str] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if timeout is not None and timeout <= 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
        self.log = log
        self.timeout = timeout
        #: Variables that identify the attempt (``JOBSCHED_RUN_ID``…), for child processes.
        self.env: dict[str, str] = dict(env or {})
        self._clock = clock
        self._deadline = None if timeout is None else clock() + timeout
        #: Called on every tick of the executor's wait loop (the worker sends heartbeats).
        self.on_tick = on_tick
        #: Set to cut a wait short: by a stop request, or by a helper thread that finished.
        self._wake = threading.Event()
        self._stop_reason: StopReason | None = None
        self._stop_message: str | None = None
        self._lock = threading.Lock()

    # -- stop requests (any thread) ---------------------------------------------------

    def request_stop(self, reason: StopReason, message: str) -> bool:
        """Ask the executor to end the attempt; the first request wins.  True if it was the first."""
        with self._lock:
            if self._stop_reason is not None:
                return False
            self._stop_reason, self._stop_message = reason, message
        self._wake.set()
        return True

    def pause(self, seconds: float) -> StopReason | None:
        """Sleep up to ``seconds``, less if a stop is requested; the stop reason, if any."""
        if self._stop_reason is None and seconds > 0:
            self._wake.wait(seconds)
            self._wake.clear()
        return self._stop_reason

    def wake(self) -> None:
        """End the executor's current wait now (a helper thread has finished)."""
        self._wake.set()

    @property
    def stop_reason(self) -> StopReason | None:
        return self._stop_reason

    @property
    def stop_message(self) -> str | None:
        return self._stop_message

    # -- for executors ----------------------------------------------------------------

    def remaining(self) -> float | None:
        """Seconds left before the attempt's timeout (None: no timeout)."""
        return None if self._deadline is None else self._deadline - self._clock()

    def ending(self) -> Ending | None:
        """Why the attempt must end now, if it must."""
        if self._stop_reason is not None:
            return self._stop_reason
        if self._deadline is not None and self._clock() >= self._deadline:
            return "timeout"
        return None

    def tick(self) -> None:
        """Flush due log chunks and let the worker do its periodic work (heartbeats)."""
        self.log.flush_due()
        if self.on_tick is not None:
            self.on_tick()

    def wait(self, seconds: float) -> Ending | None:
        """Sleep up to ``seconds`` (less if stopped or due), tick, and say whether to end."""
        rem = self.remaining()
        if rem is not None:
            seconds = min(seconds, max(rem, 0.0))
        if seconds > 0:
            self._wake.wait(seconds)
        self._wake.clear()
        self.tick()
        return self.ending()

    def ended(self, ending: Ending, *, exit_code: int | None = None) -> Outcome:
        """The outcome of an attempt stopped for ``ending``."""
        if ending == "timeout":
            return Outcome(outcome="timed_out", exit_code=exit_code, reason=f"timed out after {self.timeout:g}s")
        return Outcome(outcome="cancelled", exit_code=exit_code, reason=self._stop_message or "cancelled")


class Executor(ABC):
    """Runs one kind of executor spec."""

    kind: ClassVar[str]

    def check(self, spec: ExecutorSpec) -> str | None:
        """A reason to refuse the spec without running it, or None.  Cheap; no side effects."""
        return None

    @abstractmethod
    def execute(self, spec: ExecutorSpec, ctx: RunContext) -> Outcome:
        """Run the attempt to its end and say how it ended.  Must not raise for job errors."""


# --- shell ---------------------------------------------------------------------------------


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes of a process group.

    Reads ``/proc`` so that zombies, which ``kill(-pgid, 0)`` still counts, do not make a
    dead group look alive (a container's PID 1 may never reap orphans).
    """
    try:
        entries = os.listdir("/proc")
    except OSError:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return []
        except PermissionError:
            pass
        return [pgid]
    live = []
    for name in entries:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        # The command name may hold spaces and parentheses: parse after the last ')'.
        rest = stat[stat.rfind(b")") + 2 :].split()
        if len(rest) >= 3 and int(rest[2]) == pgid and rest[0] not in (b"Z", b"X"):
            live.append(int(name))
    return live


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _describe_exit(code: int) -> tuple[int, str]:
    """(exit code as a shell reports it, reason)."""
    if code >= 0:
        return code, f"exit code {code}"
    try:
        name = signal.Signals(-code).name
    except ValueError:
        name = f"signal {-code}"
    return 128 - code, f"killed by {name}"


class ShellExecutor(Executor):
    """Runs ``argv`` as a child process in a new session, so its whole tree can be killed.

    The environment is the worker's, then the attempt's identity (``ctx.env``:
    ``JOBSCHED_JOB_ID``, ``JOBSCHED_RUN_ID``…), then the spec's ``env`` on top.  stdout
    and stderr are read as they come (no thread per pipe: the executor's thread
    multiplexes them with a selector).  The attempt ends when the main process exits; whatever it left
    running in its process group is then terminated.  On timeout or cancel the group
    gets SIGTERM, and SIGKILL after ``kill_grace`` seconds.
    """

    kind = "shell"

    def __init__(self, *, kill_grace: float = DEFAULT_KILL_GRACE, base_env: Mapping[str, str] | None = None,
                 read_size: int = 64 * 1024, linger: float = 1.0) -> None:
        if kill_grace < 0:
            raise ValueError(f"kill_grace must be >= 0, got {kill_grace}")
        self._grace = kill_grace
        self._base_env = base_env
        self._read_size = read_size
        #: Seconds to keep reading pipes held open by leftovers after the main process exits.
        self._linger = linger

    def execute(self, spec: ExecutorSpec, ctx: RunContext) -> Outcome:
        sh = spec.shell
        if sh is None or not sh.argv:
            return Outcome(outcome="failed", reason="shell executor needs a non-empty argv")
        env = {**(os.environ if self._base_env is None else self._base_env), **ctx.env, **sh.env}
        try:
            proc = subprocess.Popen(
                list(sh.argv),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=env,
                cwd=sh.cwd or None,
                start_new_session=True,
                close_fds=True,
            )
        except OSError as e:
            return Outcome(outcome="failed", exit_code=127 if isinstance(e, FileNotFoundError) else 126,
                           reason=f"cannot start {sh.argv[0]!r}: {e.strerror or e}")
        pgid = proc.pid
        try:
            ending, leftovers = self._supervise(proc, pgid, ctx)
        finally:
            for pipe in (proc.stdout, proc.stderr):
                if pipe is not None:
                    pipe.close()
            if proc.poll() is None:  # only after an unexpected error in _supervise
                _signal_group(pgid, signal.SIGKILL)
            proc.wait()
        if leftovers:
            ctx.log.note(f"[killed {leftovers} leftover process(es) of the job's process group]")
        assert proc.returncode is not None
        exit_code, why = _describe_exit(proc.returncode)
        if ending is not None:
            return ctx.ended(ending, exit_code=exit_code)
        if proc.returncode == 0:
            return Outcome(outcome="succeeded", exit_code=0)
        return Outcome(outcome="failed", exit_code=exit_code, reason=why)

    def _pump(self, sel: selectors.BaseSelector, ctx: RunContext, timeout: float) -> None:
        """Move whatever the pipes hold into the attempt's log; forget pipes at EOF."""
        for key, _ in sel.select(timeout=timeout):
            data = os.read(key.fd, self._read_size)
            if data:
                ctx.log.write(key.data, data)
            else:
                sel.unregister(key.fileobj)

    def _supervise(self, proc: subprocess.Popen[bytes], pgid: int, ctx: RunContext) -> tuple[Ending | None, int]:
        """Pump the pipes until the job is over; kill the group when it must end."""
        sel = selectors.DefaultSelector()
        assert proc.stdout is not None and proc.stderr is not None
        sel.register(proc.stdout, selectors.EVENT_READ, "stdout")
        sel.register(proc.stderr, selectors.EVENT_READ, "stderr")
        clock = time.monotonic
        ending: Ending | None = None
        leftovers = 0
        term_at: float | None = None  # when SIGTERM went to the group
        killed = False
        linger_until: float | None = None  # main process exited; pipes may be held by leftovers
        try:
            while True:
                if sel.get_map():
                    self._pump(sel, ctx, 0.1)
                else:
                    time.sleep(0.05)
                ctx.tick()
                now = clock()
                leader_done = proc.poll() is not None
                if term_at is None:
                    why = ctx.ending()
                    if why is not None and not leader_done:
                        ending, term_at = why, now
                        _signal_group(pgid, signal.SIGTERM)
                        continue
                    if leader_done:
                        if linger_until is None:
                            linger_until = now + self._linger
                        if not sel.get_map() or now >= linger_until:
                            members = group_members(pgid)
                            if not members:
                                break
                            leftovers = len(members)
                            term_at = now
                            _signal_group(pgid, signal.SIGTERM)
                    continue
                # Killing: wait for the group to go, escalate after the grace period.
                if leader_done and not group_members(pgid):
                    break
                if not killed and now - term_at >= self._grace:
                    _signal_group(pgid, signal.SIGKILL)
                    killed = True
                if killed and now - term_at >= self._grace + 5.0:
                    break  # unkillable (D state) or escaped the group: stop waiting for it
            # The group is gone: read what is left in the pipes (EOF comes at once unless
            # a process outside the group still holds them; then give up quickly).
            drain_until = clock() + 0.5
            while sel.get_map() and clock() < drain_until:
                self._pump(sel, ctx, 0.05)
        finally:
            sel.close()
        return ending, leftovers


# --- http ----------------------------------------------------------------------------------


def _opener() -> urllib.request.OpenerDirector:
    """An opener for http(s) only: no file://, no ftp://, not even through a redirect."""
    opener = urllib.request.OpenerDirector()
    for handler in (
        urllib.request.ProxyHandler(),
        urllib.request.UnknownHandler(),
        urllib.request.HTTPHandler(),
        urllib.request.HTTPSHandler(),
        urllib.request.HTTPDefaultErrorHandler(),
        urllib.request.HTTPRedirectHandler(),
        urllib.request.HTTPErrorProcessor(),
    ):
        opener.add_handler(handler)
    return opener


class _Callers:
    """Daemon threads that run background calls, reused from one call to the next.

    A thread per call would cost a thread start (and its locks) per job.  A call that
    never returns keeps its thread; a new one is started whenever none is idle, and an
    idle thread exits after ``idle_s`` without work.
    """

    def __init__(self, idle_s: float = 60.0) -> None:
        self._work: queue.SimpleQueue[_Background] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._idle = 0
        self._idle_s = idle_s
        self._n = itertools.count(1)

    def submit(self, bg: "_Background") -> None:
        with self._lock:
            start = self._idle == 0
            if not start:
                self._idle -= 1
        self._work.put(bg)
        if start:
            threading.Thread(target=self._serve, name=f"jobsched-call-{next(self._n)}", daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                bg = self._work.get(timeout=self._idle_s)
            except queue.Empty:
                with self._lock:
                    if self._idle > 0 and self._work.empty():
                        self._idle -= 1
                        return
                continue  # a call was handed over just now: take it
            bg.run()
            bg = None  # an idle thread holds nothing of the last job
            with self._lock:
                self._idle += 1


_CALLERS = _Callers()


class _Background:
    """A call on a daemon thread, so the executor's thread can keep ticking and give up on it."""

    def __init__(self, fn: Callable[[], Any], name: str, on_done: Callable[[], None] | None = None,
                 callers: _Callers | None = None) -> None:
        self.result: Any = None
        self.error: BaseException | None = None
        self.error_tb: str = ""
        self.name = name
        self._fn = fn
        self._on_done = on_done
        self.finished = False
        (callers or _CALLERS).submit(self)

    def run(self) -> None:
        try:
            self.result = self._fn()
        except BaseException as e:  # noqa: BLE001 - reported as the job's failure
            self.error = e
            self.error_tb = traceback.format_exc()
        finally:
            self._fn = None  # type: ignore[assignment]  # nothing of the job stays on the thread
            self.finished = True  # before the wake-up, so the waiter sees it when it wakes
            on_done, self._on_done = self._on_done, None
            if on_done is not None:
                on_done()

    def wait(self, ctx: RunContext) -> Ending | None:
        """Tick until the call returns (None) or the attempt must end (why)."""
        while not self.finished:
            why = ctx.wait(0.05)
            if why is not None and not self.finished:
                return why
        return None


@dataclass(frozen=True, slots=True)
class _HttpResult:
    status: int
    reason: str
    body: bytes


class HttpExecutor(Executor):
    """Makes one HTTP request; success is a status in ``success_codes`` (or any 2xx).

    Only ``http`` and ``https`` URLs are accepted, redirects included.  The status line
    goes to the log as a system chunk and the first ``body_log_bytes`` of the body as
    stdout.  The request runs on a helper thread with a socket timeout of the attempt's
    remaining time, so timeouts and cancels end the attempt at once.
    """

    kind = "http"

    def __init__(self, *, body_log_bytes: int = DEFAULT_RESULT_LOG_BYTES,
                 default_timeout: float = DEFAULT_HTTP_TIMEOUT) -> None:
        self._body_bytes = body_log_bytes
        self._default_timeout = default_timeout

    def check(self, spec: ExecutorSpec) -> str | None:
        h = spec.http
        if h is not None and not h.url.lower().startswith(("http://", "https://")):
            return f"http executor only fetches http:// and https:// URLs, not {h.url.split(':', 1)[0]!r}"
        return None

    def execute(self, spec: ExecutorSpec, ctx: RunContext) -> Outcome:
        h = spec.http
        if h is None or not h.url:
            return Outcome(outcome="failed", reason="http executor needs a url")
        refusal = self.check(spec)
        if refusal:
            return Outcome(outcome="failed", reason=refusal)
        try:
            req = urllib.request.Request(
                h.url,
                data=None if h.body is None else h.body.encode("utf-8"),
                headers=dict(h.headers),
                method=(h.method or "GET").upper(),
            )
        except ValueError as e:
            return Outcome(outcome="failed", reason=f"bad request: {e}")
        rem = ctx.remaining()
        timeout = self._default_timeout if rem is None else max(rem, 0.001)
        limit = self._body_bytes

        def call() -> _HttpResult:
            try:
                with _opener().open(req, timeout=timeout) as resp:
                    return _HttpResult(resp.status, resp.reason or "", resp.read(limit + 1))
            except urllib.error.HTTPError as e:
                try:
                    body = e.read(limit + 1) if e.fp is not None else b""
                finally:
                    e.close()
                return _HttpResult(e.code, str(e.reason or ""), body)

        bg = _Background(call, name="http-call", on_done=ctx.wake)
        why = bg.wait(ctx)
        if why is not None:
            return ctx.ended(why)
        if bg.error is not None:
            err = bg.error
            cause = err.reason if isinstance(err, urllib.error.URLError) else err
            detail = f"{type(cause).__name__}: {cause}" if isinstance(cause, BaseException) else str(cause)
            ctx.log.write("system", f"request failed: {detail}\n")
            if isinstance(cause, TimeoutError) and ctx.timeout is not None:
                return ctx.ended("timeout")
            return Outcome(outcome="failed", reason=f"request failed: {detail}")
        res: _HttpResult = bg.result
        ctx.log.write("system", f"HTTP {res.status} {res.reason}".rstrip() + "\n")
        body = res.body[:limit]
        if body:
            ctx.log.write("stdout", body)
        if len(res.body) > limit:
            ctx.log.write("system", f"\n[response body truncated at {limit} bytes]\n")
        ok = res.status in h.success_codes if h.success_codes else 200 <= res.status < 300
        if ok:
            return Outcome(outcome="succeeded")
        return Outcome(outcome="failed", reason=f"HTTP {res.status} {res.reason}".strip())


# --- python --------------------------------------------------------------------------------


def _render(value: Any, limit: int) -> str:
    try:
        text = json.dumps(value, default=repr)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= limit else text[:limit] + f"… [{len(text) - limit} more characters]"


#: Targets remembered by a PythonExecutor (checks and loaded functions), each.
_CHECK_CACHE = 10_000


def _remember(cache: dict[str, Any], key: str, value: Any) -> None:
    """Store in a per-target cache, emptied when full (targets are few; this bounds a flood)."""
    if len(cache) >= _CHECK_CACHE:
        cache.clear()
    cache[key] = value


class PythonExecutor(Executor):
    """Calls ``pkg.module:function`` (or ``pkg.module:Class.method``) with keyword arguments.

    The module is imported in the worker process; only modules under one of
    ``allowed_modules`` (prefixes, e.g. ``("myjobs", "reports.tasks")``) may be named
    when that list is given.  The return value is logged as JSON (or ``repr``); an
    exception fails the attempt with its message and its traceback goes to stderr.
    A Python call cannot be killed: on timeout or cancel the attempt ends at once but
    the call keeps running on its (daemon) thread until it returns.
    """

    kind = "python"

    def __init__(self, *, allowed_modules: tuple[str, ...] | None = None,
                 result_log_bytes: int = DEFAULT_RESULT_LOG_BYTES) -> None:
        self._allowed = tuple(allowed_modules) if allowed_modules is not None else None
        self._result_bytes = result_log_bytes
        #: Refusal (or None) per target: every run of a job names the same one.
        self._checked: dict[str, str | None] = {}
        #: Functions already loaded, per target.
        self._loaded: dict[str, Any] = {}

    @staticmethod
    def _split(target: str) -> tuple[str, str] | None:
        module, sep, attr = target.partition(":")
        if not sep or not module or not attr or any(not p.isidentifier() for p in module.split(".") + attr.split(".")):
            return None
        return module, attr

    def check(self, spec: ExecutorSpec) -> str | None:
        p = spec.python
        if p is None:
            return None
        target = p.target
        try:
            return self._checked[target]
        except KeyError:
            pass
        refusal = None
        parts = self._split(target)
        if parts is not None:  # else reported as a failure by execute()
            module = parts[0]
            if self._allowed is not None and not any(module == a or module.startswith(a + ".") for a in self._allowed):
                allowed = ", ".join(self._allowed) or "none"
                refusal = f"python module {module!r} is not in this worker's allowed modules ({allowed})"
        _remember(self._checked, target, refusal)
        return refusal

    def execute(self, spec: ExecutorSpec, ctx: RunContext) -> Outcome:
        p = spec.python
        if p is None:
            return Outcome(outcome="failed", reason="python executor needs a target")
        fn = self._loaded.get(p.target)  # loaded before: it passed the checks below then
        if fn is None:
            parts = self._split(p.target)
            if parts is None:
                return Outcome(outcome="failed", reason=f"python target {p.target!r} is not 'package.module:function'")
            refusal = self.check(spec)
            if refusal:
                return Outcome(outcome="failed", reason=refusal)
            module_name, attr = parts
            try:
                fn = importlib.import_module(module_name)
                for name in attr.split("."):
                    fn = getattr(fn, name)
            except Exception as e:  # noqa: BLE001 - an import runs arbitrary code
                return Outcome(outcome="failed", reason=f"cannot load {p.target!r}: {type(e).__name__}: {e}")
            if not callable(fn):
                return Outcome(outcome="failed", reason=f"{p.target!r} is not callable")
            _remember(self._loaded, p.target, fn)
        try:
            kwargs = json.loads(p.kwargs_json or "{}")
        except ValueError as e:
            return Outcome(outcome="failed", reason=f"kwargs_json is not JSON: {e}")
        if not isinstance(kwargs, dict):
            return Outcome(outcome="failed", reason="kwargs_json must be a JSON object")
        bg = _Background(lambda: fn(**kwargs), name="python-call", on_done=ctx.wake)
        why = bg.wait(ctx)
        if why is not None:
            ctx.log.note("[the Python call could not be stopped; it keeps running in the worker until it returns]")
            return ctx.ended(why)
        if bg.error is not None:
            ctx.log.write("stderr", bg.error_tb)
            return Outcome(outcome="failed", reason=f"{type(bg.error).__name__}: {bg.error}")
        ctx.log.write("system", "returned: " + _render(bg.result, self._result_bytes) + "\n")
        return Outcome(outcome="succeeded")


def default_executors(*, kill_grace: float = DEFAULT_KILL_GRACE,
                      python_modules: tuple[str, ...] | None = None) -> dict[str, Executor]:
    """One executor of each kind, by kind."""
    execs: list[Executor] = [
        ShellExecutor(kill_grace=kill_grace),
        HttpExecutor(),
        PythonExecutor(allowed_modules=python_modules),
    ]
    return {e.kind: e for e in execs}
