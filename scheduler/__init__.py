"""The scheduler: a partitioned state machine driven by Kafka transactions."""
