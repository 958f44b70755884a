"""The Kafka adapter: the only layer that imports faststream (and, beneath it, aiokafka)."""
