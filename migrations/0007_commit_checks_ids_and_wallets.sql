-- Two per-row costs of the commit made per-batch checks (docs/design.md, "Idempotency without a
-- lookup"). A database that applied the two migrations this one was first written as (0007 and
-- 0008 of 2026-12-07) applies it again unchanged: every statement here may run twice.
--
-- 1. Idempotency checked by the database's own unique key instead of a lookup per batch.
--
-- The worker looked up every (wallet, id) of a batch before deciding it, to answer a command sent
-- again with its first decision: one index probe per command, about a fifth of PostgreSQL's CPU in
-- a drain, for ids that are almost always new. Now it looks up only the ids it has reasons to
-- doubt (decided on the partition lately, or the whole batch after a refusal below), presumes the
-- others new, and this function checks the presumption with the insert it makes anyway: when a
-- decision's (wallet, id) is stored already, it raises SQLSTATE FG002 before anything else is
-- written, the transaction rolls back whole, and the worker decides those records again, looking up
-- every id. The decisions go in before the wallets' update and the rest, so that a refused batch
-- costs the least.
--
-- 2. The decisions' foreign key to wallets, checked once per batch by the commit instead of once
-- per row by PostgreSQL.
--
-- A foreign key's check runs a query per inserted row and takes a KEY SHARE lock on the wallet's
-- row, which on a busy wallet the same transaction then updates: draining 200,000 charges on one
-- hot wallet, PostgreSQL spent 42-44 us of CPU a command with it and 34-36 without it
-- (`loadtest/drain.py`, interleaved runs, 2026-12-07; over 10,000 wallets the difference was
-- within the noise). `floorguard_commit` is the only writer of decisions, and it now refuses a
-- batch (SQLSTATE FG001, a bug: the worker stops) in which a decision names a wallet the batch
-- neither opens nor moves; with the guarded statement's count, that is every wallet existing.
-- The holds' foreign key stays: a hold is written by one command in twenty.
ALTER TABLE decisions DROP CONSTRAINT IF EXISTS decisions_wallet_fkey;

CREATE OR REPLACE FUNCTION floorguard_commit(
    p_topic text,
    p_partitions integer[], p_seen bigint[], p_next bigint[], p_clock bigint[],
    p_auth_version bigint,
    p_published bigint[],
    n_wallet text[], n_floor bigint[], n_partition integer[],
    m_wallet text[], m_balance_delta bigint[], m_reserved_delta bigint[], m_seq_before bigint[], m_seq bigint[],
    h_wallet text[], h_hold text[], h_amount bigint[], h_expires_at_ms bigint[], h_open boolean[], h_partition integer[],
    d_wallet text[], d_id text[], d_seq bigint[], d_op text[], d_status smallint[], d_error text[],
    d_amount bigint[], d_balance bigint[], d_reserved bigint[], d_at_ms bigint[], d_fingerprint text[],
    d_memo text[], d_partition integer[], d_offset bigint[], d_reply text[],
    o_partition integer[], o_records bytea[]
) RETURNS TABLE (result_kind text, result_partition integer, result_value bigint)
LANGUAGE plpgsql AS $$
DECLARE
    current_version bigint;
    moved integer;
    inserted integer;
BEGIN
    PERFORM 1 FROM partitions AS p
    WHERE p.topic = p_topic AND p.partition = ANY (p_partitions)
    ORDER BY p.partition FOR UPDATE;

    RETURN QUERY
    SELECT 'fenced', a.partition, coalesce(p.next_offset, -1)
    FROM unnest(p_partitions, p_seen) AS a (partition, seen_offset)
    LEFT JOIN partitions AS p ON p.topic = p_topic AND p.partition = a.partition
    WHERE p.next_offset IS DISTINCT FROM a.seen_offset;
    IF FOUND THEN
        RETURN;
    END IF;

    SELECT s.version INTO current_version FROM auth_settings AS s;
    IF current_version IS DISTINCT FROM p_auth_version THEN
        RETURN QUERY SELECT 'auth', NULL::integer, current_version;
        RETURN;
    END IF;

    IF cardinality(n_wallet) > 0 THEN
        INSERT INTO wallets (wallet, balance, reserved, floor, seq, partition)
        SELECT n.wallet, 0, 0, n.floor, 1, n.partition
        FROM unnest(n_wallet, n_floor, n_partition) AS n (wallet, floor, partition);
    END IF;

    IF cardinality(d_wallet) > 0 THEN
        INSERT INTO decisions (wallet, id, seq, op, status, error, amount, balance, reserved, at_ms,
                               fingerprint, memo, partition, "offset", reply)
        SELECT * FROM unnest(d_wallet, d_id, d_seq, d_op, d_status, d_error, d_amount, d_balance,
                             d_reserved, d_at_ms, d_fingerprint, d_memo, d_partition, d_offset, d_reply)
        ON CONFLICT (wallet, id) DO NOTHING;
        GET DIAGNOSTICS inserted = ROW_COUNT;
        IF inserted <> cardinality(d_wallet) THEN
            RAISE EXCEPTION '% of % decisions are stored already', cardinality(d_wallet) - inserted,
                cardinality(d_wallet) USING ERRCODE = 'FG002';
        END IF;
        -- What the foreign key checked row by row: each decision's wallet was opened by this batch
        -- or is moved by it (a stored decision always moves its wallet's seq), and the guarded
        -- statement below refuses the whole batch unless every moved wallet exists.
        IF EXISTS (SELECT unnest(d_wallet) EXCEPT SELECT unnest(n_wallet || m_wallet)) THEN
            RAISE EXCEPTION 'a decision names a wallet the batch neither opens nor moves'
                USING ERRCODE = 'FG001';
        END IF;
    END IF;

    IF cardinality(m_wallet) > 0 THEN
        UPDATE wallets AS w
        SET balance = w.balance + m.balance_delta,
            reserved = w.reserved + m.reserved_delta,
            seq = m.seq
        FROM unnest(m_wallet, m_balance_delta, m_reserved_delta, m_seq_before, m_seq)
            AS m (wallet, balance_delta, reserved_delta, seq_before, seq)
        WHERE w.wallet = m.wallet
          AND w.seq = m.seq_before
          AND w.balance + m.balance_delta - (w.reserved + m.reserved_delta) >= w.floor;
        GET DIAGNOSTICS moved = ROW_COUNT;
        IF moved <> cardinality(m_wallet) THEN
            RAISE EXCEPTION 'guarded update changed % of % wallets', moved, cardinality(m_wallet)
                USING ERRCODE = 'FG001';
        END IF;
    END IF;

    IF cardinality(h_wallet) > 0 THEN
        INSERT INTO holds (wallet, hold, amount, expires_at_ms, open, partition)
        SELECT * FROM unnest(h_wallet, h_hold, h_amount, h_expires_at_ms, h_open, h_partition)
        ON CONFLICT (wallet, hold) DO UPDATE
        SET amount = excluded.amount, expires_at_ms = excluded.expires_at_ms, open = excluded.open;
    END IF;

    UPDATE partitions AS p SET next_offset = a.next_offset, clock_ms = a.clock_ms
    FROM unnest(p_partitions, p_next, p_clock) AS a (partition, next_offset, clock_ms)
    WHERE p.topic = p_topic AND p.partition = a.partition;

    IF cardinality(p_published) > 0 THEN
        DELETE FROM outbox WHERE position = ANY (p_published);
    END IF;

    RETURN QUERY
    INSERT INTO outbox (source_topic, source_partition, records)
    SELECT p_topic, o.partition, o.records FROM unnest(o_partition, o_records) AS o (partition, records)
    RETURNING 'outbox'::text, outbox.source_partition, outbox.position;
END
$$;
