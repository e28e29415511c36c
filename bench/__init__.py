"""Benchmarks of jobsched through the real stack: ``python -m bench`` (``make bench``).

Scenarios (one module each): throughput, timers, failover, memory, scaleout, peer
(Celery + Redis on the same machine), ceiling (raw confluent-kafka), and profile
(py-spy on the services under the throughput workload).  See docs/benchmarks.md.
"""
