-- casf-verifier audit trail (PostgreSQL). Idempotent: `casf-verifier migrate`
-- applies it, and so can `psql -f sql/init.sql`.
--
-- Each row is one decision. `hash` is the hex SHA-256 of the plain
-- concatenation request_id || event_id || ts || actor || action || decision
-- || canonical_json(payload) || prev_hash, with prev_hash = '' at genesis.
-- `ts` is stored as the exact text that was hashed (UTC,
-- YYYY-MM-DDTHH:MM:SS.ffffffZ), so it sorts as time and needs no rendering
-- rules to recompute. canonical_json is sorted keys, no whitespace, UTF-8
-- unescaped; it is recomputed from the JSONB value, which round-trips because
-- the verifier writes numbers in a form JSONB preserves.

CREATE TABLE IF NOT EXISTS audit_events (
    id          BIGSERIAL PRIMARY KEY,
    request_id  TEXT        NOT NULL,
    event_id    UUID        NOT NULL UNIQUE,
    ts          TEXT        NOT NULL,
    actor       TEXT        NOT NULL,
    action      TEXT        NOT NULL,
    decision    TEXT        NOT NULL,
    payload     JSONB       NOT NULL,
    prev_hash   TEXT        NOT NULL,
    hash        TEXT        NOT NULL UNIQUE
);

CREATE INDEX IF NOT EXISTS audit_events_ts ON audit_events (ts);
CREATE INDEX IF NOT EXISTS audit_events_request_id ON audit_events (request_id);

-- Append-only against mistakes: UPDATE and DELETE are refused. Deliberate
-- tampering by a superuser is what the hash chain detects.
CREATE OR REPLACE FUNCTION audit_events_append_only() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit_events is append-only';
END;
$$;

DROP TRIGGER IF EXISTS audit_events_no_update ON audit_events;
CREATE TRIGGER audit_events_no_update BEFORE UPDATE OR DELETE ON audit_events
    FOR EACH ROW EXECUTE FUNCTION audit_events_append_only();
DROP TRIGGER IF EXISTS audit_events_no_truncate ON audit_events;
CREATE TRIGGER audit_events_no_truncate BEFORE TRUNCATE ON audit_events
    FOR EACH STATEMENT EXECUTE FUNCTION audit_events_append_only();
