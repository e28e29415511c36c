"""The native local stack, against the real processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from infra.config import Settings
from infra.stack import status, up

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[2]
SERVICES = ["postgres", "kafka", "ferretdb"]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not stat.exists() or stat.read_text().rpartition(")")[2].split()[0] != "Z"


def test_status_reports_every_service_healthy_with_live_pids(stack_settings: Settings) -> None:
    st = status(stack_settings)
    assert [s.name for s in st.services] == SERVICES
    assert st.healthy, st.to_dict()
    for s in st.services:
        assert s.pid is not None and _alive(s.pid), f"{s.name}: pid {s.pid} is not a live process"
        assert s.log_path.is_file(), f"{s.name}: no log at {s.log_path}"


def test_up_again_is_a_quick_no_op(stack_settings: Settings) -> None:
    before = {s.name: s.pid for s in status(stack_settings).services}
    messages: list[str] = []
    started = time.monotonic()
    after = up(stack_settings, log=messages.append)
    elapsed = time.monotonic() - started
    assert after.healthy
    assert {s.name: s.pid for s in after.services} == before
    assert not [m for m in messages if "starting" in m or "creating" in m or "fetching" in m], messages
    assert elapsed < 5.0, f"a second up took {elapsed:.1f} s"


def test_cli_status_json(stack_settings: Settings) -> None:
    env = dict(os.environ, JOBSCHED_HOME=str(stack_settings.home), JOBSCHED_CACHE=str(stack_settings.cache))
    result = subprocess.run(
        [sys.executable, "-m", "infra", "status", "--json"],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=60, check=False,
    )
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["healthy"] is True
    assert [s["name"] for s in doc["services"]] == SERVICES
    assert all(s["running"] and s["answering"] and isinstance(s["pid"], int) for s in doc["services"])
