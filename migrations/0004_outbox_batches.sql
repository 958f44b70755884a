-- The outbox holds one row per partition's batch instead of one per record: a batch of 500
-- commands writes (and, once published, deletes) one row, not a thousand. The row's `records` is
-- the batch's records in order, as one MessagePack array of [topic, partition, key, value,
-- headers] (headers: an array of [name, value]); the worker encodes and decodes it with msgspec
-- (worker/store/rows.py). Rows of the old shape are carried over, one row per source partition,
-- in their order, encoded here in the same format with fixed-width MessagePack types.

ALTER TABLE outbox RENAME TO outbox_records;

CREATE TABLE outbox (
    position         bigserial PRIMARY KEY,
    source_topic     text    NOT NULL,
    source_partition integer NOT NULL,
    records          bytea   NOT NULL
);

CREATE FUNCTION pg_temp.mp_array(size integer) RETURNS bytea LANGUAGE sql IMMUTABLE
    AS $$ SELECT '\xdd'::bytea || int4send(size) $$;
CREATE FUNCTION pg_temp.mp_str(value text) RETURNS bytea LANGUAGE sql IMMUTABLE
    AS $$ SELECT '\xdb'::bytea || int4send(octet_length(convert_to(value, 'UTF8'))) || convert_to(value, 'UTF8') $$;
CREATE FUNCTION pg_temp.mp_bin(value bytea) RETURNS bytea LANGUAGE sql IMMUTABLE
    AS $$ SELECT CASE WHEN value IS NULL THEN '\xc0'::bytea ELSE '\xc6'::bytea || int4send(octet_length(value)) || value END $$;
CREATE FUNCTION pg_temp.mp_int(value integer) RETURNS bytea LANGUAGE sql IMMUTABLE
    AS $$ SELECT CASE WHEN value IS NULL THEN '\xc0'::bytea ELSE '\xd2'::bytea || int4send(value) END $$;
-- The old headers column: a JSON list of [name, hex of value].
CREATE FUNCTION pg_temp.mp_headers(headers text) RETURNS bytea LANGUAGE sql IMMUTABLE AS $$
    SELECT pg_temp.mp_array(jsonb_array_length(headers::jsonb)) || coalesce((
        SELECT string_agg(pg_temp.mp_array(2) || pg_temp.mp_str(h ->> 0) || pg_temp.mp_bin(decode(h ->> 1, 'hex')),
                          ''::bytea ORDER BY n)
        FROM jsonb_array_elements(headers::jsonb) WITH ORDINALITY AS e (h, n)), ''::bytea)
$$;

-- New positions start past the old ones: a worker of the old shape still running during the
-- upgrade deletes the positions it published, and must not meet a new row under one of them.
SELECT setval(pg_get_serial_sequence('outbox', 'position'),
              (SELECT coalesce(max(position), 0) FROM outbox_records) + 1, false);

INSERT INTO outbox (source_topic, source_partition, records)
SELECT source_topic, source_partition,
       pg_temp.mp_array(count(*)::integer) || string_agg(
           pg_temp.mp_array(5) || pg_temp.mp_str(topic) || pg_temp.mp_int(partition) || pg_temp.mp_bin(key)
           || pg_temp.mp_bin(value) || pg_temp.mp_headers(headers), ''::bytea ORDER BY position)
FROM outbox_records
GROUP BY source_topic, source_partition;

DROP TABLE outbox_records;

CREATE INDEX outbox_by_source ON outbox (source_topic, source_partition, position);
