"""The decision core: pure, synchronous, deterministic. It imports only the standard library.

`parse` turns a raw Kafka record into a `Command` or an `Invalid`; `decide` turns a partition's
batch of parsed records and the state they touch into decisions. Nothing here does I/O, reads a
clock or draws a random number, so the same history always gives the same decisions.
"""
