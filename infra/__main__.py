"""``python -m infra up|down|status [--json]|reset``: the native local stack.

Settings come from the ``JOBSCHED_*`` environment variables (``Settings.from_env``).

Exit codes: 0 done (for ``status``: every service healthy), 1 a stack or configuration
error (one line on stderr, followed by the tail of the failing service's log) or, for
``status``, a service that is down or not answering; 2 a usage error; 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from infra.config import ConfigError, Settings
from infra.stack import StackError, StackStatus, down, reset, status, up

RET_OK = 0
RET_ERROR = 1
RET_INTERRUPTED = 130


def _print_table(st: StackStatus) -> None:
    print(f"{'service':<10} {'state':<13} {'pid':>8}  {'address':<22} log")
    for s in st.services:
        state = "healthy" if s.healthy else ("not answering" if s.running else "stopped")
        pid = str(s.pid) if s.pid is not None else "-"
        print(f"{s.name:<10} {state:<13} {pid:>8}  {s.address:<22} {s.log_path}")


def _progress(message: str) -> None:
    # Progress goes to stderr so that stdout carries only the result (table or JSON).
    print(message, file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m infra", description="Run the local Kafka/PostgreSQL/FerretDB stack.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.add_parser("up", help="fetch/build what is missing and start every service (idempotent)")
    commands.add_parser("down", help="stop the services this stack started; keep their data")
    st = commands.add_parser("status", help="show each service: running, pid, address, log, answering")
    st.add_argument("--json", action="store_true", help="print the status as JSON")
    commands.add_parser("reset", help="stop everything and delete the stack's data (not the download cache)")
    args = parser.parse_args(argv)

    try:
        settings = Settings.from_env()
        if args.command == "up":
            _print_table(up(settings, log=_progress))
        elif args.command == "down":
            down(settings, log=_progress)
        elif args.command == "reset":
            reset(settings, log=_progress)
        else:
            result = status(settings)
            if args.json:
                print(json.dumps(result.to_dict(), indent=2))
            else:
                _print_table(result)
            return RET_OK if result.healthy else RET_ERROR
    except (StackError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return RET_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return RET_INTERRUPTED
    return RET_OK


if __name__ == "__main__":
    sys.exit(main())
