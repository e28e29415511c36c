"""Infrastructure: settings, Kafka adapter, topics, the native local stack."""
