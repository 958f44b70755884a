-- The outbox holds one row per partition's batch instead of one per record: a batch of 500
-- commands writes (and, once published, deletes) one row, not a thousand. Each row keeps the
-- batch's records in order, field by field in parallel arrays. Rows left by the old shape are
-- carried over, one row per source partition, in their order.

ALTER TABLE outbox RENAME TO outbox_records;

CREATE TABLE outbox (
    position         bigserial PRIMARY KEY,
    source_topic     text      NOT NULL,
    source_partition integer   NOT NULL,
    topics           text[]    NOT NULL,
    partitions       integer[] NOT NULL,  -- a null element: placed by key
    keys             bytea[]   NOT NULL,
    "values"         bytea[]   NOT NULL,
    headers          text[]    NOT NULL,  -- each a JSON list of [name, hex of value]
    CONSTRAINT outbox_arrays_parallel CHECK (
        cardinality(topics) = cardinality(partitions) AND cardinality(topics) = cardinality(keys)
        AND cardinality(topics) = cardinality("values") AND cardinality(topics) = cardinality(headers)
    )
);

INSERT INTO outbox (source_topic, source_partition, topics, partitions, keys, "values", headers)
SELECT source_topic, source_partition, array_agg(topic ORDER BY position), array_agg(partition ORDER BY position),
       array_agg(key ORDER BY position), array_agg(value ORDER BY position), array_agg(headers ORDER BY position)
FROM outbox_records
GROUP BY source_topic, source_partition;

DROP TABLE outbox_records;

CREATE INDEX outbox_by_source ON outbox (source_topic, source_partition, position);
