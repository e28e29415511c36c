"""Pure helpers of the native local stack: ids, the rendered Kafka config, URL parsing."""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from infra import stack
from infra.config import ConfigError, Settings
from infra.stack import (
    PostgresTarget,
    ServiceStatus,
    StackError,
    StackStatus,
    new_cluster_id,
    parse_host_port,
    parse_mongo_url,
    parse_postgres_url,
    parse_properties,
    render_server_properties,
)

# --------------------------------------------------------------------------- cluster id


def _assert_valid_cluster_id(cid: str) -> None:
    assert re.fullmatch(r"[A-Za-z0-9_-]{22}", cid), cid
    assert not cid.startswith("-")
    assert len(base64.urlsafe_b64decode(cid + "==")) == 16


def test_cluster_id_is_16_bytes_base64url_without_padding() -> None:
    ids = {new_cluster_id() for _ in range(200)}
    assert len(ids) == 200
    for cid in ids:
        _assert_valid_cluster_id(cid)


def test_cluster_id_never_starts_with_a_dash() -> None:
    # 0xF8 encodes to '-' as the first base64url character: the first draw must be refused.
    draws: Iterator[bytes] = iter([b"\xf8" + bytes(15), b"\x00" * 16])
    cid = new_cluster_id(lambda n: next(draws))
    assert cid == base64.urlsafe_b64encode(b"\x00" * 16).decode().rstrip("=")
    _assert_valid_cluster_id(cid)


# --------------------------------------------------------------------------- server.properties


def _render(**overrides: object) -> dict[str, str]:
    args: dict[str, object] = {
        "node_id": 1,
        "broker": ("127.0.0.1", 9092),
        "controller": ("127.0.0.1", 9093),
        "log_dir": Path("/srv/js/kafka/data"),
    }
    args.update(overrides)
    text = render_server_properties(stack.SERVER_PROPERTIES_TEMPLATE.read_text(), **args)  # type: ignore[arg-type]
    assert "$" not in text
    return parse_properties(text)


def test_rendered_properties_describe_one_combined_kraft_node() -> None:
    props = _render()
    assert props["process.roles"] == "broker,controller"
    assert props["node.id"] == "1"
    assert props["listeners"] == "PLAINTEXT://127.0.0.1:9092,CONTROLLER://127.0.0.1:9093"
    assert props["advertised.listeners"] == "PLAINTEXT://127.0.0.1:9092"
    assert props["controller.listener.names"] == "CONTROLLER"
    assert props["listener.security.protocol.map"] == "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT"
    # A dynamic quorum formatted with --standalone: voters must not be set.
    assert props["controller.quorum.bootstrap.servers"] == "127.0.0.1:9093"
    assert "controller.quorum.voters" not in props
    assert props["log.dirs"] == "/srv/js/kafka/data"


def test_rendered_properties_have_the_single_node_settings() -> None:
    props = _render()
    expected = {
        "offsets.topic.replication.factor": "1",
        "transaction.state.log.replication.factor": "1",
        "transaction.state.log.min.isr": "1",
        "share.coordinator.state.topic.replication.factor": "1",
        "share.coordinator.state.topic.min.isr": "1",
        "offsets.topic.num.partitions": "4",
        "transaction.state.log.num.partitions": "4",
        "group.initial.rebalance.delay.ms": "0",
        "auto.create.topics.enable": "false",
        "group.min.session.timeout.ms": "1000",
        "transaction.abort.timed.out.transaction.cleanup.interval.ms": "1000",
        "transaction.remove.expired.transaction.cleanup.interval.ms": "60000",
        "num.partitions": "1",
    }
    assert {k: props.get(k) for k in expected} == expected


def test_rendered_properties_bracket_ipv6_hosts() -> None:
    props = _render(broker=("::1", 19092), controller=("::1", 19093))
    assert props["listeners"] == "PLAINTEXT://[::1]:19092,CONTROLLER://[::1]:19093"
    assert props["controller.quorum.bootstrap.servers"] == "[::1]:19093"


def test_a_template_placeholder_without_a_value_is_an_error() -> None:
    with pytest.raises(KeyError):
        render_server_properties(
            "x=${unknown}\n", node_id=1, broker=("h", 1), controller=("h", 2), log_dir=Path("/d")
        )


def test_parse_properties_skips_comments_and_blank_lines() -> None:
    assert parse_properties("# c\n! c\n\n a = b \nc=d=e\n") == {"a": "b", "c": "d=e"}


def test_kafka_version_comes_from_the_pom() -> None:
    pom = stack.KAFKA_POM.read_text()
    version = stack._kafka_version()
    assert f"<kafka.version>{version}</kafka.version>" in pom


# --------------------------------------------------------------------------- URL parsing


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("127.0.0.1:9092", ("127.0.0.1", 9092)),
        ("localhost:19092,localhost:19093", ("localhost", 19092)),
        (" [::1]:9092 ", ("::1", 9092)),
    ],
)
def test_parse_host_port(value: str, expected: tuple[str, int]) -> None:
    assert parse_host_port(value) == expected


def test_parse_host_port_uses_the_default_port_only_when_given() -> None:
    assert parse_host_port("db.local", default_port=27017) == ("db.local", 27017)
    with pytest.raises(ConfigError, match="no port"):
        parse_host_port("db.local")


@pytest.mark.parametrize("value", ["", "host:notaport", "host:0", "host:70000", ":9092", "[::1"])
def test_parse_host_port_rejects_nonsense(value: str) -> None:
    with pytest.raises(ConfigError):
        parse_host_port(value)


def test_parse_default_postgres_url() -> None:
    assert parse_postgres_url(Settings().postgres_url) == PostgresTarget(
        host="127.0.0.1", port=55432, user="postgres", dbname="jobsched"
    )


def test_parse_postgres_url_defaults_and_schemes() -> None:
    target = parse_postgres_url("postgres://db.example/app%20db")
    assert target == PostgresTarget(host="db.example", port=5432, user="postgres", dbname="app db")
    assert target.address == "db.example:5432"
    assert parse_postgres_url("postgresql://alice@[::1]:6000/x").address == "[::1]:6000"


@pytest.mark.parametrize("url", ["mysql://h/db", "postgresql://h:5432/", "postgresql://h:99999/db"])
def test_parse_postgres_url_rejects(url: str) -> None:
    with pytest.raises(ConfigError):
        parse_postgres_url(url)


def test_parse_mongo_url() -> None:
    assert parse_mongo_url(Settings().mongo_url) == ("127.0.0.1", 27017)
    assert parse_mongo_url("mongodb://u:p@h1:27018,h2:27019/db?x=1") == ("h1", 27018)
    assert parse_mongo_url("mongodb://h1/") == ("h1", 27017)
    with pytest.raises(ConfigError):
        parse_mongo_url("mongodb+srv://cluster.example/")


# --------------------------------------------------------------------------- Kafka lib check


def _lib(tmp_path: Path, *names: str) -> Path:
    for n in names:
        (tmp_path / n).write_bytes(b"")
    return tmp_path


_COMPLETE = ("kafka_2.13-4.1.1.jar", "slf4j-api-1.7.36.jar", "log4j-slf4j-impl-2.24.3.jar")


def test_a_complete_kafka_lib_passes(tmp_path: Path) -> None:
    assert stack._check_kafka_lib(_lib(tmp_path, *_COMPLETE), "4.1.1") is None


@pytest.mark.parametrize(
    ("names", "problem"),
    [
        (_COMPLETE + ("slf4j-api-2.0.16.jar",), "exactly one slf4j-api"),
        (_COMPLETE[1:], "kafka_<scala>-4.1.1.jar"),
        (_COMPLETE[:2], "log4j-slf4j-impl"),
    ],
)
def test_an_incomplete_kafka_lib_is_refused(tmp_path: Path, names: tuple[str, ...], problem: str) -> None:
    result = stack._check_kafka_lib(_lib(tmp_path, *names), "4.1.1")
    assert result is not None and problem in result


# --------------------------------------------------------------------------- values


def _svc(name: str, *, running: bool, answering: bool) -> ServiceStatus:
    return ServiceStatus(
        name=name, running=running, pid=42 if running else None, address="127.0.0.1:1",
        log_path=Path(f"/h/logs/{name}.log"), answering=answering,
    )


def test_stack_status_is_healthy_only_when_every_service_answers() -> None:
    good = StackStatus(services=(_svc("a", running=True, answering=True), _svc("b", running=True, answering=True)))
    bad = StackStatus(services=(_svc("a", running=True, answering=True), _svc("b", running=True, answering=False)))
    assert good.healthy and not bad.healthy
    assert not StackStatus(services=()).healthy
    doc = json.loads(json.dumps(bad.to_dict()))
    assert doc["healthy"] is False
    assert doc["services"][1] == {
        "name": "b", "running": True, "pid": 42, "address": "127.0.0.1:1", "log": "/h/logs/b.log", "answering": False,
    }
    assert bad.service("b").answering is False


def test_stack_error_has_a_one_line_message_and_the_log_tail() -> None:
    err = StackError("kafka: exited (log: /h/kafka.log)", service="kafka", log_tail=["line 1", "line 2"])
    assert isinstance(err, RuntimeError)
    assert "\n" not in err.message
    assert str(err).splitlines() == ["kafka: exited (log: /h/kafka.log)", "    line 1", "    line 2"]


# --------------------------------------------------------------------------- a home never started


def test_status_and_down_of_a_fresh_home_touch_nothing(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path / "home", cache=tmp_path / "cache")
    st = stack.status(settings)
    assert [s.name for s in st.services] == ["postgres", "kafka", "ferretdb"]
    assert not any(s.running or s.answering for s in st.services)
    assert st.service("kafka").log_path == tmp_path / "home" / "logs" / "kafka.log"
    stack.down(settings)
    stack.reset(settings)
    assert not (tmp_path / "home").exists()
