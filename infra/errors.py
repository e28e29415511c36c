"""The project's exception tree.

::

    JobschedError
    ├── ConfigError(ValueError)         a setting cannot work            (infra.config)
    ├── ValidationError(ValueError)     a job or request is refused; the message says why
    │   └── DependencyCycle             a DAG has a cycle; names it
    ├── ContractError
    │   ├── DecodeError(ValueError)     bytes are not a known event   -> dead-letter topic
    │   └── EncodeError(ValueError)     a value does not fit its schema
    ├── JobNotFound(LookupError)        no job with that id (yet)
    └── Unavailable(ConnectionError)    a service did not answer
        ├── BrokerUnavailable           Kafka
        └── StoreUnavailable            PostgreSQL or MongoDB

Adapters translate driver errors into these and chain them (``raise … from e``);
domain code and the CLI see nothing else.
"""

from __future__ import annotations


class JobschedError(Exception):
    """Root of every error the project raises on purpose."""


class ValidationError(JobschedError, ValueError):
    """A request is refused; the message says what is wrong."""


class DependencyCycle(ValidationError):
    """The submitted dependencies contain a cycle."""

    def __init__(self, cycle: list[str]) -> None:
        self.cycle = cycle
        super().__init__("dependency cycle: " + " -> ".join([*cycle, cycle[0]]))


class ContractError(JobschedError):
    """Bytes and events do not match the Avro contract."""


class DecodeError(ContractError, ValueError):
    """Bytes that cannot be read as any known event."""


class EncodeError(ContractError, ValueError):
    """An event that cannot be written with its schema."""


class JobNotFound(JobschedError, LookupError):
    """No job with that id is known."""

    def __init__(self, job_id: str) -> None:
        self.job_id = job_id
        super().__init__(f"no job with id {job_id!r}")


class Unavailable(JobschedError, ConnectionError):
    """A service the operation needs did not answer."""


class BrokerUnavailable(Unavailable):
    """Kafka did not answer."""


class StoreUnavailable(Unavailable):
    """PostgreSQL or MongoDB did not answer."""
