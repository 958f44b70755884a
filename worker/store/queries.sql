-- Every SQL statement of the worker, each in one named block. `worker/store/queries.py` loads
-- them by name; Python holds no SQL of its own.

-- name: claim_partition
INSERT INTO partitions (topic, partition, next_offset, clock_ms)
VALUES ($1, $2, 0, 0)
ON CONFLICT (topic, partition) DO NOTHING;

-- name: partition_position
SELECT next_offset, clock_ms FROM partitions WHERE topic = $1 AND partition = $2;

-- name: partition_positions_of
SELECT partition, next_offset, clock_ms FROM partitions WHERE topic = $1 AND partition = ANY($2::integer[]);

-- name: lock_partitions
-- With the auth version (see auth_version): the statement takes its lock on the partitions table
-- before its snapshot, so a key change (which holds the table in EXCLUSIVE mode until it commits)
-- is either visible in this read or waits for this transaction to end.
SELECT partition, next_offset, clock_ms, (SELECT version FROM auth_settings) AS auth_version
FROM partitions
WHERE topic = $1 AND partition = ANY($2::integer[])
ORDER BY partition FOR UPDATE;

-- name: finish_batch
-- The end of a batch's transaction in one round trip: each partition advanced from the offset this
-- worker saw (its rows are locked by the batch) to where its batch ends; the outbox rows the broker
-- has acknowledged deleted; each partition's records to publish inserted as one row.
WITH advanced AS (
    UPDATE partitions AS p SET next_offset = a.next_offset, clock_ms = a.clock_ms
    FROM unnest($2::text::integer[], $3::text::bigint[], $4::text::bigint[], $5::text::bigint[])
        AS a (partition, seen_offset, next_offset, clock_ms)
    WHERE p.topic = $1 AND p.partition = a.partition AND p.next_offset = a.seen_offset
    RETURNING 1
), published AS (
    DELETE FROM outbox WHERE position = ANY($6::text::bigint[]) RETURNING 1
)
INSERT INTO outbox (source_topic, source_partition, records)
SELECT $1, o.source_partition, o.records FROM unnest($7::text::integer[], $8::bytea[]) AS o (source_partition, records)
RETURNING source_partition, position;

-- Lists of ids and integers come as one text parameter each, in array syntax (worker/store/rows.py).

-- name: load_wallets
SELECT wallet, balance, reserved, floor, seq, partition
FROM wallets WHERE wallet = ANY($1::text::text[]);

-- name: load_decisions
SELECT d.wallet, d.id, d.fingerprint, d.reply
FROM decisions AS d
JOIN unnest($1::text::text[], $2::text::text[]) AS k (wallet, id) ON d.wallet = k.wallet AND d.id = k.id;

-- name: insert_wallets
INSERT INTO wallets (wallet, balance, reserved, floor, seq, partition)
SELECT wallet, 0, 0, floor, 1, partition
FROM unnest($1::text::text[], $2::text::bigint[], $3::text::integer[]) AS n (wallet, floor, partition);

-- name: apply_wallets
-- The guarded statement: check and move in the same breath. A row whose move would take it
-- below its floor, or whose seq is not the one the decision was made on, is not updated.
UPDATE wallets AS w
SET balance = w.balance + n.balance_delta,
    reserved = w.reserved + n.reserved_delta,
    seq = n.seq
FROM unnest($1::text::text[], $2::text::bigint[], $3::text::bigint[], $4::text::bigint[], $5::text::bigint[])
    AS n (wallet, balance_delta, reserved_delta, seq_before, seq)
WHERE w.wallet = n.wallet
  AND w.seq = n.seq_before
  AND w.balance + n.balance_delta - (w.reserved + n.reserved_delta) >= w.floor;

-- name: outbox_of_partition
SELECT position, records FROM outbox WHERE source_topic = $1 AND source_partition = $2
ORDER BY position;

-- name: delete_outbox
DELETE FROM outbox WHERE position = ANY($1::bigint[]);

-- name: show_wallet
SELECT wallet, balance, reserved, floor, seq, partition FROM wallets WHERE wallet = $1;

-- name: migrations_lock
SELECT pg_advisory_xact_lock(7402194);

-- name: migrations_table
CREATE TABLE IF NOT EXISTS schema_migrations (
    version    text PRIMARY KEY,
    applied_at timestamptz NOT NULL DEFAULT now()
);

-- name: migrations_applied
SELECT version FROM schema_migrations ORDER BY version;

-- name: migration_record
INSERT INTO schema_migrations (version) VALUES ($1);

-- name: load_holds
SELECT h.wallet, h.hold, h.amount, h.expires_at_ms, h.open, h.partition
FROM holds AS h
JOIN unnest($1::text::text[], $2::text::text[]) AS k (wallet, hold) ON h.wallet = k.wallet AND h.hold = k.hold;

-- name: upsert_holds
INSERT INTO holds (wallet, hold, amount, expires_at_ms, open, partition)
SELECT * FROM unnest($1::text::text[], $2::text::text[], $3::text::bigint[], $4::text::bigint[],
                     $5::text::boolean[], $6::text::integer[])
ON CONFLICT (wallet, hold) DO UPDATE
SET amount = excluded.amount, expires_at_ms = excluded.expires_at_ms, open = excluded.open;

-- name: load_prices
SELECT model, valid_from_ms, input_price, output_price FROM prices WHERE model = ANY($1::text[]);

-- name: add_price
-- The start must lie ahead of the database's clock (by $5 ms at least), so that no decision
-- already made falls under the new row.
INSERT INTO prices (model, valid_from_ms, input_price, output_price)
SELECT $1, $2, $3, $4
WHERE $2 >= (extract(epoch FROM clock_timestamp()) * 1000)::bigint + $5
RETURNING valid_from_ms;

-- name: list_prices
SELECT model, valid_from_ms, input_price, output_price FROM prices ORDER BY model, valid_from_ms;

-- name: expired_holds
-- Open holds of the given partitions whose expiry has passed by the given broker time.
SELECT wallet, hold, partition, expires_at_ms FROM holds
WHERE open AND partition = ANY($1::integer[]) AND expires_at_ms <= $2
ORDER BY expires_at_ms
LIMIT $3;

-- name: earliest_open_hold
SELECT wallet, hold, partition, expires_at_ms FROM holds
WHERE open AND partition = ANY($1::integer[])
ORDER BY expires_at_ms
LIMIT 1;

-- name: audit_floor
SELECT wallet, balance, reserved, floor FROM wallets WHERE balance - reserved < floor ORDER BY wallet;

-- name: audit_balances
-- A wallet's balance is the sum of its accepted money moves.
SELECT w.wallet, w.balance, coalesce(m.moved, 0) AS moved
FROM wallets AS w
LEFT JOIN (
    SELECT wallet, sum(CASE WHEN op = 'credit' THEN amount ELSE -amount END) AS moved
    FROM decisions WHERE status = 200 AND op IN ('credit', 'charge', 'capture')
    GROUP BY wallet
) AS m ON m.wallet = w.wallet
WHERE w.balance <> coalesce(m.moved, 0)
ORDER BY w.wallet;

-- name: audit_reserved
SELECT w.wallet, w.reserved, coalesce(h.held, 0) AS held
FROM wallets AS w
LEFT JOIN (SELECT wallet, sum(amount) AS held FROM holds WHERE open GROUP BY wallet) AS h ON h.wallet = w.wallet
WHERE w.reserved <> coalesce(h.held, 0)
ORDER BY w.wallet;

-- name: audit_sequences
-- seq runs from 1 to the wallet's seq without gaps or repeats.
SELECT w.wallet, w.seq, count(d.seq) AS decided, coalesce(min(d.seq), 0) AS first, coalesce(max(d.seq), 0) AS last
FROM wallets AS w LEFT JOIN decisions AS d ON d.wallet = w.wallet
GROUP BY w.wallet, w.seq
HAVING count(d.seq) <> w.seq OR coalesce(min(d.seq), 0) <> 1 OR coalesce(max(d.seq), 0) <> w.seq
ORDER BY w.wallet;

-- name: audit_offsets
-- No decision past its partition's stored position, and one decision at most per record.
SELECT d.partition, d."offset", count(*) AS decisions, max(p.next_offset) AS next_offset
FROM decisions AS d JOIN partitions AS p ON p.partition = d.partition AND p.topic = $1
GROUP BY d.partition, d."offset"
HAVING count(*) > 1 OR d."offset" >= max(p.next_offset)
ORDER BY d.partition, d."offset"
LIMIT 100;

-- name: audit_counts
SELECT (SELECT count(*) FROM wallets) AS wallets, (SELECT count(*) FROM decisions) AS decisions,
       (SELECT coalesce(sum(seq), 0) FROM wallets) AS seq_total;

-- name: wallet_seqs
SELECT wallet, seq FROM wallets;

-- name: decisions_by_seq
SELECT d.wallet, d.seq, d.reply, d.partition, d."offset"
FROM decisions AS d
JOIN unnest($1::text[], $2::bigint[]) AS k (wallet, seq) ON d.wallet = k.wallet AND d.seq = k.seq;

-- name: decisions_in_order
SELECT wallet, id, seq, op, status, error, amount, balance, reserved, at_ms, fingerprint, partition, "offset", reply
FROM decisions ORDER BY wallet, seq;

-- name: wallets_in_order
SELECT wallet, balance, reserved, floor, seq, partition FROM wallets ORDER BY wallet;

-- name: partition_positions
SELECT partition, next_offset FROM partitions WHERE topic = $1 ORDER BY partition;

-- name: copy_price
INSERT INTO prices (model, valid_from_ms, input_price, output_price) VALUES ($1, $2, $3, $4)
ON CONFLICT DO NOTHING;

-- name: is_empty
SELECT NOT EXISTS (SELECT 1 FROM wallets) AND NOT EXISTS (SELECT 1 FROM partitions);

-- name: auth_version
-- Read when a batch is decided, and again in its transaction after its partition rows are locked:
-- a key change (which locks the partitions table until it commits) is then wholly before the
-- batch or wholly after it, and a batch decided under an older version is decided again.
SELECT version, master_check FROM auth_settings;

-- name: auth_modes
SELECT valid_from_ms, mode FROM auth_modes ORDER BY valid_from_ms;

-- name: auth_keys_named
SELECT key_id, scope, wallet, valid_from_ms, revoked_at_ms FROM auth_keys WHERE key_id = ANY($1::text[]);

-- name: auth_hold_batches
-- A key change waits for the batches under way and holds the next ones back until it commits
-- (every batch locks its partition rows, which this mode conflicts with; plain reads go on).
LOCK TABLE partitions IN EXCLUSIVE MODE;

-- name: latest_clock_ms
-- With the batches held: no command decided so far has a later time than this.
SELECT coalesce(max(clock_ms), 0) FROM partitions;

-- name: database_time_ms
SELECT (extract(epoch FROM clock_timestamp()) * 1000)::bigint;

-- name: auth_bump_version
UPDATE auth_settings SET version = version + 1;

-- name: auth_set_master_check
-- The first master secret used with the ledger is its master secret for good; returns the stored check.
UPDATE auth_settings SET master_check = coalesce(master_check, $1) RETURNING master_check;

-- name: auth_add_mode
INSERT INTO auth_modes (valid_from_ms, mode) VALUES ($1, $2);

-- name: auth_add_key
INSERT INTO auth_keys (key_id, scope, wallet, label, valid_from_ms) VALUES ($1, $2, $3, $4, $5)
ON CONFLICT (key_id) DO NOTHING
RETURNING key_id;

-- name: auth_revoke_key
UPDATE auth_keys SET revoked_at_ms = $2 WHERE key_id = $1 AND revoked_at_ms IS NULL
RETURNING revoked_at_ms;

-- name: auth_list_keys
SELECT key_id, scope, wallet, label, valid_from_ms, revoked_at_ms FROM auth_keys
ORDER BY created_at, key_id;

-- name: auth_copy_mode
INSERT INTO auth_modes (valid_from_ms, mode) VALUES ($1, $2) ON CONFLICT DO NOTHING;

-- name: auth_copy_key
INSERT INTO auth_keys (key_id, scope, wallet, label, valid_from_ms, revoked_at_ms) VALUES ($1, $2, $3, $4, $5, $6)
ON CONFLICT DO NOTHING;
