"""Avro contract of the job scheduler: schemas, event classes and the codec."""
