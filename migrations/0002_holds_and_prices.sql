-- Holds (reserve → extend → capture | release | expire) and the price table for `usage`.

CREATE TABLE holds (
    wallet        text    NOT NULL REFERENCES wallets (wallet),
    hold          text    NOT NULL,  -- the id of the reserve that opened it
    amount        bigint  NOT NULL CHECK (amount >= 0 AND amount <= 9007199254740991),
    expires_at_ms bigint  NOT NULL,  -- broker time, like every time in the ledger
    open          boolean NOT NULL,
    partition     integer NOT NULL,
    PRIMARY KEY (wallet, hold)
);

-- What the sweeper looks for: open holds of a partition, soonest expiry first.
CREATE INDEX holds_open_by_expiry ON holds (partition, expires_at_ms) WHERE open;

-- Rows are only ever added: a decision depends on the row in force at its command's time, so a
-- changed or deleted row would make a replay decide differently.
CREATE TABLE prices (
    model         text   NOT NULL,
    valid_from_ms bigint NOT NULL,
    input_price   bigint NOT NULL CHECK (input_price >= 0 AND input_price <= 9007199254740991),
    output_price  bigint NOT NULL CHECK (output_price >= 0 AND output_price <= 9007199254740991),
    added_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (model, valid_from_ms)
);

CREATE FUNCTION prices_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'prices are append-only: add a row with a later valid_from instead';
END;
$$;

CREATE TRIGGER prices_append_only BEFORE UPDATE OR DELETE ON prices
    FOR EACH ROW EXECUTE FUNCTION prices_append_only();
