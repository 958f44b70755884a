-- The ledger: wallets, their decisions, the outbox of records to publish, and the position of
-- each commands partition. Migrations are append-only: a change is a new file, never an edit.

CREATE TABLE wallets (
    wallet      text    PRIMARY KEY,
    balance     bigint  NOT NULL,
    reserved    bigint  NOT NULL,
    floor       bigint  NOT NULL,
    seq         bigint  NOT NULL,   -- the number of this wallet's last stored decision
    partition   integer NOT NULL,   -- the commands partition that owns the wallet
    -- The second guard of the invariant: an overdraft is impossible even for a buggy writer.
    CONSTRAINT wallets_floor_guard CHECK (balance - reserved >= floor),
    CONSTRAINT wallets_reserved_nonnegative CHECK (reserved >= 0),
    CONSTRAINT wallets_floor_nonpositive CHECK (floor <= 0),
    CONSTRAINT wallets_safe_integers CHECK (
        balance BETWEEN -9007199254740991 AND 9007199254740991
        AND reserved <= 9007199254740991
        AND floor >= -9007199254740991
    ),
    CONSTRAINT wallets_seq_positive CHECK (seq >= 1)
);

CREATE TABLE decisions (
    wallet      text     NOT NULL REFERENCES wallets (wallet),
    id          text     NOT NULL,  -- the command id: the idempotency key within the wallet
    seq         bigint   NOT NULL,
    op          text     NOT NULL,
    status      smallint NOT NULL,
    error       text,
    amount      bigint,
    balance     bigint   NOT NULL,  -- the wallet right after the decision
    reserved    bigint   NOT NULL,
    at_ms       bigint   NOT NULL,  -- the command's time: its partition's clock, broker time
    fingerprint text     NOT NULL,  -- sha256 of the request, every field but memo
    memo        text,
    partition   integer  NOT NULL,
    "offset"    bigint   NOT NULL,
    reply       text     NOT NULL,  -- the reply exactly as first sent, for duplicates
    PRIMARY KEY (wallet, id),
    CONSTRAINT decisions_seq_unique UNIQUE (wallet, seq)
);

CREATE INDEX decisions_position ON decisions (partition, "offset");

-- Where each commands partition stands: the next offset to decide and the partition's clock.
-- A worker advances a row only from the value it last saw, which fences off a worker that lost
-- the partition in a rebalance.
CREATE TABLE partitions (
    topic       text    NOT NULL,
    partition   integer NOT NULL,
    next_offset bigint  NOT NULL CHECK (next_offset >= 0),
    clock_ms    bigint  NOT NULL,
    PRIMARY KEY (topic, partition)
);

-- Replies, events and dead letters written with the decision, published after the commit and
-- deleted once the broker has them: at least once, never lost.
CREATE TABLE outbox (
    position         bigserial PRIMARY KEY,
    source_topic     text    NOT NULL,
    source_partition integer NOT NULL,
    topic            text    NOT NULL,
    partition        integer,          -- null: placed by key
    key              bytea,
    value            bytea   NOT NULL,
    headers          text    NOT NULL  -- JSON list of [name, hex of value]
);

CREATE INDEX outbox_by_source ON outbox (source_topic, source_partition, position);
