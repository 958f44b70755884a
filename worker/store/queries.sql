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

-- name: commit_batch
-- A batch's transaction in one round trip (migrations/0006_commit_in_one_call.sql). Lists of ids
-- and integers come as one text parameter each, in array syntax (worker/store/rows.py); memos and
-- replies, which may hold any character, as text arrays.
SELECT result_kind, result_partition, result_value FROM floorguard_commit(
    $1,
    $2::text::integer[], $3::text::bigint[], $4::text::bigint[], $5::text::bigint[],
    $6, $7::text::bigint[],
    $8::text::text[], $9::text::bigint[], $10::text::integer[],
    $11::text::text[], $12::text::bigint[], $13::text::bigint[], $14::text::bigint[], $15::text::bigint[],
    $16::text::text[], $17::text::text[], $18::text::bigint[], $19::text::bigint[], $20::text::boolean[],
    $21::text::integer[],
    $22::text::text[], $23::text::text[], $24::text::bigint[], $25::text::text[], $26::text::smallint[],
    $27::text::text[], $28::text::bigint[], $29::text::bigint[], $30::text::bigint[], $31::text::bigint[],
    $32::text::text[], $33::text[], $34::text::integer[], $35::text::bigint[], $36::text[],
    $37::text::integer[], $38::bytea[]);

-- Lists of ids and integers come as one text parameter each, in array syntax (worker/store/rows.py).

-- name: load_wallets
SELECT wallet, balance, reserved, floor, seq, partition
FROM wallets WHERE wallet = ANY($1::text::text[]);

-- name: load_decisions
SELECT d.wallet, d.id, d.fingerprint, d.reply
FROM decisions AS d
JOIN unnest($1::text::text[], $2::text::text[]) AS k (wallet, id) ON d.wallet = k.wallet AND d.id = k.id;

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
-- Read by a worker at start and when a commit met another version (floorguard_commit compares it
-- after the partitions' rows are locked: a key change, which locks the partitions table until it
-- commits, is then wholly before the batch or wholly after it), and by the tools.
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
