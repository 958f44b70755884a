-- Authentication and authority (the contract's Security section). No secret is stored here: a
-- key's secret is derived from the operators' master secret and the key's id, so the database
-- holds only what the key may do and when it was valid.
--
-- Every time below is in milliseconds on the broker's clock, like every time in the ledger, and is
-- compared with the command's time: a decision depends on its command and on these rows only, so a
-- replay with the same rows (and the same master secret) decides exactly as the live worker did.

-- One row: what lets a worker check that its master secret is the ledger's (a keyed hash of a
-- fixed text, which reveals nothing of the master), and a version that every change below bumps,
-- so that a worker knows when what it has cached is stale.
CREATE TABLE auth_settings (
    singleton    boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    master_check text,
    version      bigint NOT NULL DEFAULT 0
);
INSERT INTO auth_settings DEFAULT VALUES;

-- When authentication became required or was turned off: append-only. A command is checked when
-- the latest row at or before its time says `required`; without rows, authentication is off.
CREATE TABLE auth_modes (
    valid_from_ms bigint PRIMARY KEY,
    mode          text   NOT NULL CHECK (mode IN ('off', 'required')),
    changed_at    timestamptz NOT NULL DEFAULT now()
);

-- scope: 'wallet' spends from one wallet (charge, reserve, extend, capture, release), 'admin' may do
-- every op on every wallet, 'expire' may only expire holds (the workers' sweeper).
CREATE TABLE auth_keys (
    key_id         text   PRIMARY KEY CHECK (key_id ~ '^[A-Za-z0-9_-]{1,64}$'),
    scope          text   NOT NULL CHECK (scope IN ('wallet', 'admin', 'expire')),
    wallet         text   CHECK ((scope = 'wallet') = (wallet IS NOT NULL)),
    label          text   NOT NULL DEFAULT '' CHECK (length(label) <= 256),
    valid_from_ms  bigint NOT NULL,
    revoked_at_ms  bigint CHECK (revoked_at_ms IS NULL OR revoked_at_ms >= valid_from_ms),
    created_at     timestamptz NOT NULL DEFAULT now()
);

CREATE FUNCTION auth_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        RAISE EXCEPTION '% rows are never deleted: revoke a key instead', TG_TABLE_NAME;
    END IF;
    IF TG_TABLE_NAME = 'auth_keys' AND OLD.revoked_at_ms IS NULL
       AND (NEW.key_id, NEW.scope, NEW.wallet, NEW.label, NEW.valid_from_ms)
           IS NOT DISTINCT FROM (OLD.key_id, OLD.scope, OLD.wallet, OLD.label, OLD.valid_from_ms) THEN
        RETURN NEW;  -- the one change allowed: a key's revocation, once
    END IF;
    RAISE EXCEPTION '% rows are append-only (a key may only be revoked, once)', TG_TABLE_NAME;
END;
$$;

CREATE TRIGGER auth_keys_append_only BEFORE UPDATE OR DELETE ON auth_keys
    FOR EACH ROW EXECUTE FUNCTION auth_append_only();
CREATE TRIGGER auth_modes_append_only BEFORE UPDATE OR DELETE ON auth_modes
    FOR EACH ROW EXECUTE FUNCTION auth_append_only();
