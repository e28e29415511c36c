"""``jobsched``: the command line for users and operators.

Exit codes: 0 ok; 1 an operation failed; 2 bad usage (click); 3 no such job;
4 a service is unavailable; 5 the request was refused as invalid.  A user mistake is
one line on stderr, never a traceback.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, NoReturn, TypeVar

import click

from infra.config import Settings
from infra.errors import JobNotFound, JobschedError, Unavailable, ValidationError

RET_OK, RET_FAILED, RET_USAGE, RET_NOT_FOUND, RET_UNAVAILABLE, RET_INVALID = 0, 1, 2, 3, 4, 5

F = TypeVar("F", bound=Callable[..., Any])


def _fail(message: str, code: int) -> NoReturn:
    click.echo(f"jobsched: {message}", err=True)
    sys.exit(code)


def _settings(ctx: click.Context) -> Settings:
    return ctx.obj["settings"]  # type: ignore[no-any-return]


def _client(ctx: click.Context) -> Any:
    from producers.client import JobClient

    client = JobClient(_settings(ctx), user_id=ctx.obj.get("user"))
    ctx.call_on_close(client.close)
    return client


class _Group(click.Group):
    """Turns the project's errors into one clear line and a documented exit code."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except JobNotFound as e:
            _fail(str(e), RET_NOT_FOUND)
        except ValidationError as e:
            _fail(str(e), RET_INVALID)
        except Unavailable as e:
            _fail(str(e), RET_UNAVAILABLE)
        except JobschedError as e:
            _fail(str(e), RET_FAILED)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--user", envvar="JOBSCHED_USER", help="User id stamped on the commands you send.")
@click.pass_context
def cli(ctx: click.Context, user: str | None) -> None:
    """A distributed job scheduler on Apache Kafka."""
    ctx.ensure_object(dict)
    # Broker connection chatter is for service logs; a user gets one line from us.
    logging.getLogger("jobsched.kafka").setLevel(logging.CRITICAL)
    try:
        ctx.obj["settings"] = Settings.from_env()
    except JobschedError as e:
        _fail(str(e), RET_USAGE)
    ctx.obj["user"] = user


# --- submit & control ------------------------------------------------------------------


def _pairs(values: tuple[str, ...], what: str) -> dict[str, str]:
    out = {}
    for v in values:
        if "=" not in v:
            raise click.BadParameter(f"{what} must look like KEY=VALUE, got {v!r}")
        k, _, val = v.partition("=")
        out[k] = val
    return out


@cli.command(context_settings={"ignore_unknown_options": False})
@click.option("--name", help="A name to recognise the job by (default: the command).")
@click.option("--json", "as_json", is_flag=True, help='Print {"job_id": ...} instead of the bare id.')
@click.option("--at", "at", metavar="TIME", help="Run once at this ISO-8601 time with offset, e.g. 2026-12-24T18:00:00+01:00.")
@click.option("--in", "delay", metavar="DURATION", help="Run once after this long, e.g. 90s, 5m, 1h30m.")
@click.option("--cron", metavar="EXPR", help='Run on this 5-field cron schedule, e.g. "0 2 * * *".')
@click.option("--tz", "timezone", default="UTC", show_default=True,
              help="IANA time zone the cron expression is read in (DST: a skipped time runs once at the jump, a repeated time once).")
@click.option("--overlap", type=click.Choice(["allow", "forbid", "replace"]), default="forbid", show_default=True,
              help="When a cron run is due while the previous is still going: run both, skip the new one, or cancel the old one.")
@click.option("--catchup", type=click.Choice(["skip", "latest", "all"]), default="latest", show_default=True,
              help="Cron runs missed while the system was down: none, only the latest, or all of them.")
@click.option("--catchup-window", metavar="DURATION", default="24h", show_default=True,
              help="Missed runs older than this are never caught up.")
@click.option("--after", "after", multiple=True, metavar="JOB_ID",
              help="Run only after this job completed (repeatable). If it fails or is cancelled, this job fails/is cancelled too.")
@click.option("--retries", type=click.IntRange(0, 100), default=0, show_default=True, help="Retries after a failed attempt.")
@click.option("--backoff", default="1s", show_default=True, metavar="DURATION",
              help="Delay before the first retry; doubles each time, with jitter.")
@click.option("--backoff-max", default="5m", show_default=True, metavar="DURATION", help="Longest delay between retries.")
@click.option("--timeout", metavar="DURATION", help="Kill an attempt after this long (the process group is killed).")
@click.option("--queue", default="default", show_default=True, help="Worker pool that runs the job.")
@click.option("--priority", type=click.Choice(["high", "normal", "low"]), default="normal", show_default=True,
              help="High-priority jobs overtake queued normal and low ones.")
@click.option("--env", "env", multiple=True, metavar="KEY=VALUE", help="Environment variable for the command (repeatable).")
@click.option("--cwd", help="Working directory of the command.")
@click.option("--label", "labels", multiple=True, metavar="KEY=VALUE", help="Free-form label (repeatable).")
@click.option("--http", "http_url", metavar="URL", help="Instead of a command: call this URL.")
@click.option("--method", default="GET", show_default=True, help="HTTP method for --http.")
@click.option("--python", "python_target", metavar="MODULE:FUNC", help="Instead of a command: call this registered Python function.")
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
@click.pass_context
def submit(ctx: click.Context, name: str | None, as_json: bool, at: str | None, delay: str | None, cron: str | None,
           timezone: str, overlap: str, catchup: str, catchup_window: str, after: tuple[str, ...], retries: int,
           backoff: str, backoff_max: str, timeout: str | None, queue: str, priority: str, env: tuple[str, ...],
           cwd: str | None, labels: tuple[str, ...], http_url: str | None, method: str, python_target: str | None,
           command: tuple[str, ...]) -> None:
    """Submit a job: jobsched submit [OPTIONS] -- CMD [ARGS...]

    \b
    Examples:
      jobsched submit -- echo hello
      jobsched submit --in 10m --retries 3 -- ./backup.sh
      jobsched submit --cron "30 2 * * *" --tz Europe/Paris --catchup all -- ./report.sh
      jobsched submit --after 3f2c... --after 9a1b... -- ./merge.sh
    """
    client = _client(ctx)
    job_id = client.submit(
        list(command) or None, name=name, at=at, delay=delay, cron=cron, timezone=timezone, overlap=overlap,
        catchup=catchup, catchup_window=catchup_window, after=list(after), retries=retries, backoff=backoff,
        backoff_max=backoff_max, timeout=timeout, queue=queue, priority=priority, env=_pairs(env, "--env"), cwd=cwd,
        labels=_pairs(labels, "--label"), http={"url": http_url, "method": method} if http_url else None,
        python=python_target,
    )
    click.echo(json.dumps({"job_id": job_id}) if as_json else job_id)


@cli.command("submit-dag")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print name -> job id as JSON.")
@click.pass_context
def submit_dag(ctx: click.Context, file: Path, as_json: bool) -> None:
    """Submit a DAG of jobs from a YAML or JSON file, all or nothing.

    \b
    jobs:
      - name: extract
        command: [./extract.sh]
      - name: transform
        command: [./transform.sh]
        after: [extract]
        retries: 2
    """
    import yaml

    try:
        doc = yaml.safe_load(file.read_text())
    except yaml.YAMLError as e:
        raise ValidationError(f"{file}: not valid YAML/JSON: {e}") from e
    jobs = doc.get("jobs") if isinstance(doc, dict) else doc
    if not isinstance(jobs, list) or not all(isinstance(j, dict) for j in jobs):
        raise ValidationError(f"{file}: expected a list of jobs (or a mapping with 'jobs:')")
    ids = _client(ctx).submit_dag(jobs)
    if as_json:
        click.echo(json.dumps(ids))
    else:
        for n, i in ids.items():
            click.echo(f"{i}  {n}")


def _simple(verb: str, doc: str) -> None:
    @cli.command(verb, help=doc)
    @click.argument("job_id")
    @click.pass_context
    def _cmd(ctx: click.Context, job_id: str) -> None:
        client = _client(ctx)
        getattr(client, verb)(job_id)
        click.echo(f"{verb} requested for {job_id}")


_simple("cancel", "Cancel a job: a pending job never runs; a running one is killed.")
_simple("pause", "Pause a recurring job: no new runs until resumed (missed ones are skipped).")
_simple("resume", "Resume a paused job.")


# --- reading ---------------------------------------------------------------------------


@cli.command()
@click.argument("job_id")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--wait", "wait_s", type=float, default=3.0, show_default=True,
              help="Seconds to wait for a just-submitted job to appear.")
@click.pass_context
def status(ctx: click.Context, job_id: str, as_json: bool, wait_s: float) -> None:
    """Show a job's status, attempts and runs."""
    client = _client(ctx)
    deadline = time.monotonic() + wait_s
    while True:
        try:
            job = client.status(job_id)
            break
        except JobNotFound:
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.2)
    if as_json:
        click.echo(json.dumps(job, default=str))
        return
    click.echo(f"{job['job_id']}  {job['name']}")
    click.echo(f"  status:   {job['status']}" + (f" ({job['reason']})" if job.get("reason") else ""))
    click.echo(f"  attempts: {job['attempts']}   created: {job['created_at']}")
    if job.get("next_fire_at"):
        click.echo(f"  next run: {job['next_fire_at']}")
    for r in job.get("runs", []):
        click.echo(f"  run {r['run_id']} #{r['attempt']}: {r['status']}"
                   + (f" exit={r['exit_code']}" if r.get("exit_code") is not None else "")
                   + (f" ({r['reason']})" if r.get("reason") else ""))


@cli.command("list")
@click.option("--status", "status_", help="Only jobs with this status.")
@click.option("--mine", is_flag=True, help="Only jobs of the current user.")
@click.option("--limit", type=click.IntRange(1, 1000), default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def list_jobs(ctx: click.Context, status_: str | None, mine: bool, limit: int, as_json: bool) -> None:
    """List jobs, newest first."""
    client = _client(ctx)
    jobs = client.list(status=status_, user_id=client.user_id if mine else None, limit=limit)
    for j in jobs:
        click.echo(json.dumps(j, default=str) if as_json else f"{j['job_id']}  {j['status']:<10} {j['name']}")


@cli.command()
@click.argument("job_id")
@click.option("--run", "run_id", help="Only this run.")
@click.option("-f", "--follow", is_flag=True, help="Keep printing output as it arrives until the run ends.")
@click.pass_context
def logs(ctx: click.Context, job_id: str, run_id: str | None, follow: bool) -> None:
    """Print a job's output, in order."""
    client = _client(ctx)
    chunks = client.follow(job_id, run_id=run_id) if follow else client.logs(job_id, run_id=run_id)
    out = sys.stdout
    for c in chunks:
        if c.get("stream") == "system" and not c.get("data"):
            continue
        out.write(c["data"])
        out.flush()


@cli.command()
@click.option("--topic", required=True, help="Topic to read, e.g. jobs.commands or jobs.events.")
@click.option("--from-beginning", is_flag=True, help="Start at the oldest retained record (default: only new ones).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line (default: a short summary).")
@click.option("--limit", type=int, default=0, help="Stop after this many records (0: no limit).")
@click.option("--idle", type=float, default=2.0, show_default=True, help="Stop when nothing arrives for this many seconds.")
@click.pass_context
def replay(ctx: click.Context, topic: str, from_beginning: bool, as_json: bool, limit: int, idle: float) -> None:
    """Print the decoded events of a topic (for audits and debugging)."""
    from consumers.replay import replay_topic

    for line in replay_topic(_settings(ctx), topic, from_beginning=from_beginning, as_json=as_json, limit=limit,
                             idle_s=idle):
        click.echo(line)


# --- services --------------------------------------------------------------------------


def _service_logging(json_logs: bool) -> None:
    from infra.logs import configure

    configure(json=json_logs)
    logging.getLogger("jobsched.kafka").setLevel(logging.WARNING)


@cli.command()
@click.option("--instance", help="Stable instance id (default: host-pid-random).")
@click.option("--metrics-port", type=int, default=0, help="Serve Prometheus metrics on this port.")
@click.option("--lookahead-ms", type=click.IntRange(0, 30_000), default=None, envvar="JOBSCHED_DISPATCH_LOOKAHEAD_MS",
              help="Dispatch timed runs this long before they are due; workers start them on time "
                   "[default: 1000; 0 dispatches at the due time].")
@click.pass_context
def scheduler(ctx: click.Context, instance: str | None, metrics_port: int, lookahead_ms: int | None) -> None:
    """Run one scheduler instance (run several: the others are standbys)."""
    from infra.metrics import serve
    from scheduler.service import main
    from scheduler.state import SchedulerConfig

    _service_logging(True)
    serve(metrics_port)
    config = SchedulerConfig(dispatch_lookahead_ms=lookahead_ms) if lookahead_ms is not None else None
    main(_settings(ctx), instance_id=instance, config=config)


@cli.command()
@click.option("--queue", "queues", multiple=True, default=("default",), show_default=True, help="Queue to serve (repeatable).")
@click.option("--concurrency", type=click.IntRange(1, 1024), default=4, show_default=True, help="Jobs run at once.")
@click.option("--allow", default="shell,http", show_default=True, help="Executors this worker may run (shell,http,python).")
@click.option("--metrics-port", type=int, default=0, help="Serve Prometheus metrics on this port.")
@click.option("--start-report-delay-ms", type=click.IntRange(0, 60_000), default=200, show_default=True,
              envvar="JOBSCHED_START_REPORT_DELAY_MS",
              help="Report a start this long after it, if the job still runs; shorter jobs report start and end "
                   "in one record. 0 reports every start at once.")
@click.pass_context
def worker(ctx: click.Context, queues: tuple[str, ...], concurrency: int, allow: str, metrics_port: int,
           start_report_delay_ms: int) -> None:
    """Run a worker that executes jobs from the given queues."""
    from consumers.worker import Worker
    from infra.metrics import serve
    from infra.service import run_until_signalled

    _service_logging(True)
    serve(metrics_port)
    allowed = frozenset(a.strip() for a in allow.split(",") if a.strip())
    try:
        w = Worker(_settings(ctx), queues=tuple(queues), concurrency=concurrency, allow=allowed,
                   start_report_delay=start_report_delay_ms / 1000)
    except ValueError as e:
        raise ValidationError(str(e)) from e
    run_until_signalled(w)


@cli.command()
@click.option("--what", type=click.Choice(["all", "postgres", "logs"]), default="all", show_default=True)
@click.option("--metrics-port", type=int, default=0, help="Serve Prometheus metrics on this port.")
@click.pass_context
def project(ctx: click.Context, what: str, metrics_port: int) -> None:
    """Run the projectors that build the PostgreSQL and MongoDB read models."""
    import threading

    from consumers.projections.logs_projector import LogsProjector
    from consumers.projections.pg_projector import PostgresProjector
    from infra.metrics import serve
    from infra.service import run_until_signalled

    _service_logging(True)
    serve(metrics_port)
    s = _settings(ctx)
    services: list[Any] = []
    if what in ("all", "postgres"):
        services.append(PostgresProjector(s))
    if what in ("all", "logs"):
        services.append(LogsProjector(s))

    class _Both:
        name = "projectors"

        def run(self, stop: threading.Event) -> None:
            threads = [threading.Thread(target=svc.run, args=(stop,), name=svc.name) for svc in services]
            for t in threads:
                t.start()
            for t in threads:
                t.join()

    run_until_signalled(_Both())


@cli.command()
@click.pass_context
def migrate(ctx: click.Context) -> None:
    """Create or upgrade the PostgreSQL projection schema (idempotent)."""
    from consumers.projections.migrate import migrate as run_migrations

    run_migrations(_settings(ctx))
    click.echo("projection schema is up to date")


@cli.command("rebuild-projections")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@click.option("--idle", type=float, default=3.0, show_default=True,
              help="Consider the replay done when nothing new was applied for this many seconds.")
@click.pass_context
def rebuild_projections(ctx: click.Context, yes: bool, idle: float) -> None:
    """Drop the PostgreSQL projection and rebuild it by replaying jobs.events.

    Stop the running projectors (`jobsched project`) first; start them again afterwards.
    """
    import threading

    from consumers.projections.migrate import create_pg_engine
    from consumers.projections.migrate import migrate as run_migrations
    from consumers.projections.pg_projector import PostgresProjector, reset_projection

    s = _settings(ctx)
    if not yes:
        click.confirm("This empties the jobs, runs, dependencies and audit tables, then replays jobs.events. Go on?",
                      abort=True)
    run_migrations(s)
    engine = create_pg_engine(s)
    try:
        reset_projection(engine, consumers=[s.group_id("projector-pg")])
    finally:
        engine.dispose()
    projector = PostgresProjector(s, kafka_group=s.group_id(f"projector-pg-rebuild-{os.getpid()}"))
    stop = threading.Event()
    thread = threading.Thread(target=projector.run, args=(stop,), daemon=True)
    t0 = time.monotonic()
    thread.start()
    last, quiet_since = -1, time.monotonic()
    while True:
        time.sleep(0.25)
        n = projector.stats.records
        if n != last:
            last, quiet_since = n, time.monotonic()
        elif time.monotonic() - quiet_since >= idle:
            break
    stop.set()
    thread.join(60)
    took = time.monotonic() - t0 - idle
    click.echo(f"replayed {projector.stats.records} events ({projector.stats.applied} applied, "
               f"{projector.stats.dead} dead-lettered) in {took:.1f}s")


@cli.command()
@click.option("--schedulers", type=click.IntRange(1, 8), default=2, show_default=True,
              help="Scheduler instances (one active per partition, the rest standby).")
@click.option("--workers", type=click.IntRange(0, 16), default=1, show_default=True)
@click.option("--concurrency", type=click.IntRange(1, 1024), default=8, show_default=True)
@click.option("--no-stack", is_flag=True, help="Do not start the local stack (use external services).")
@click.pass_context
def run(ctx: click.Context, schedulers: int, workers: int, concurrency: int, no_stack: bool) -> None:
    """Start the whole system in the foreground; Ctrl-C stops it cleanly."""
    from infra.supervisor import Supervisor

    _service_logging(sys.stderr.isatty() is False)
    s = _settings(ctx)
    if not no_stack:
        from infra import stack

        stack.up(s, log=lambda m: click.echo(m, err=True))
    from infra.kafka import ensure_topics

    ensure_topics(s)
    from consumers.projections.migrate import migrate

    migrate(s)
    Supervisor.for_system(s, schedulers=schedulers, workers=workers, concurrency=concurrency).run_forever()


# --- stack & topics --------------------------------------------------------------------


@cli.group()
def stack() -> None:
    """The local Kafka / PostgreSQL / FerretDB stack, started natively."""


@stack.command("up")
@click.pass_context
def stack_up(ctx: click.Context) -> None:
    """Fetch, build and start whatever is not running (idempotent)."""
    from infra import stack as st

    status = st.up(_settings(ctx.parent), log=lambda m: click.echo(m, err=True))  # type: ignore[arg-type]
    click.echo(json.dumps(status.to_dict()))


@stack.command("down")
@click.option("--purge", is_flag=True, help="Also delete the stack's data.")
@click.pass_context
def stack_down(ctx: click.Context, purge: bool) -> None:
    """Stop exactly what `stack up` started."""
    from infra import stack as st

    (st.reset if purge else st.down)(_settings(ctx.parent))  # type: ignore[arg-type]


@stack.command("status")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def stack_status(ctx: click.Context, as_json: bool) -> None:
    """Show each service: running, pid, address, log file."""
    from infra import stack as st

    status = st.status(_settings(ctx.parent))  # type: ignore[arg-type]
    if as_json:
        click.echo(json.dumps(status.to_dict()))
    else:
        for svc in status.to_dict()["services"]:
            click.echo(f"{svc['name']:<10} {'up' if svc.get('healthy', svc.get('running')) else 'DOWN':<5} "
                       f"pid={svc.get('pid')} {svc.get('address')} log={svc.get('log')}")
    if not status.healthy:
        sys.exit(RET_UNAVAILABLE)


@cli.command("topics")
@click.pass_context
def topics(ctx: click.Context) -> None:
    """Create every topic the system uses (idempotent) and list them."""
    from infra.kafka import ensure_topics
    from infra.topics import topic_specs

    s = _settings(ctx)
    created = set(ensure_topics(s))
    for t in topic_specs(s):
        click.echo(f"{t.name:<32} partitions={t.partitions:<3} {'created' if t.name in created else 'exists'}  {t.purpose}")


def main() -> None:
    cli(prog_name="jobsched")


if __name__ == "__main__":
    main()
