-- casf-verifier audit trail (PostgreSQL 14+). `casf-verifier migrate`
-- applies this file (it is compiled into the binary), and so can
-- `psql -v ON_ERROR_STOP=1 -f sql/init.sql`. It is idempotent and safe to run
-- concurrently: everything happens in one transaction that first takes the
-- writers' advisory lock, so two runs (or a run and a live verifier) queue
-- instead of racing on the catalog.
--
-- Each row is one decision. `hash` is the hex SHA-256 of the plain
-- concatenation request_id || event_id || ts || actor || action || decision
-- || canonical_json(payload) || prev_hash, with prev_hash = '' at genesis.
-- `ts` is stored as the exact text that was hashed (UTC,
-- YYYY-MM-DDTHH:MM:SS.ffffffZ); with the "C" collation it sorts bytewise,
-- which for this format is time order, whatever the database's locale.
-- `event_id` is read back as lowercase hyphenated text, the form hashed.
-- canonical_json is sorted keys, no whitespace, UTF-8 unescaped; it is
-- recomputed from the JSONB value, which round-trips because the verifier
-- writes numbers in a form JSONB preserves (see README, "PostgreSQL audit").

BEGIN;

SELECT pg_advisory_xact_lock(42);

CREATE TABLE IF NOT EXISTS audit_events (
    id          BIGSERIAL   PRIMARY KEY,
    request_id  TEXT        NOT NULL,
    event_id    UUID        NOT NULL UNIQUE,
    ts          TEXT        COLLATE "C" NOT NULL,
    actor       TEXT        NOT NULL,
    action      TEXT        NOT NULL,
    decision    TEXT        NOT NULL,
    payload     JSONB       NOT NULL,
    prev_hash   TEXT        NOT NULL,
    hash        TEXT        NOT NULL UNIQUE
);

CREATE INDEX IF NOT EXISTS audit_events_ts ON audit_events (ts);
CREATE INDEX IF NOT EXISTS audit_events_request_id ON audit_events (request_id);

-- Append-only against mistakes: UPDATE, DELETE and TRUNCATE are refused.
-- Deliberate tampering by someone who can drop the triggers is what the hash
-- chain detects.
CREATE OR REPLACE FUNCTION audit_events_append_only() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit_events is append-only (% refused)', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END;
$$;

CREATE OR REPLACE TRIGGER audit_events_no_update
    BEFORE UPDATE OR DELETE ON audit_events
    FOR EACH ROW EXECUTE FUNCTION audit_events_append_only();
CREATE OR REPLACE TRIGGER audit_events_no_truncate
    BEFORE TRUNCATE ON audit_events
    FOR EACH STATEMENT EXECUTE FUNCTION audit_events_append_only();

COMMIT;
