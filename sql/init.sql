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

-- One round trip per batch: the verifier calls this with the hashes already
-- chained from the head it expects. Under the writers' lock the function
-- checks that head and appends, or appends nothing and returns the actual
-- head (id NULL) so the caller can re-chain and call again. PL/pgSQL runs
-- each statement on a fresh snapshot (READ COMMITTED), so the head is read
-- after the lock is held. Rows come back as (id, hash) in chain order.
-- A database initialised without it still works: the verifier then uses a
-- transaction of several round trips (see README, "PostgreSQL audit").
CREATE OR REPLACE FUNCTION casf_audit_append(
    expected_head TEXT,
    request_ids TEXT[], event_ids UUID[], tss TEXT[], actors TEXT[],
    actions TEXT[], decisions TEXT[], payloads JSONB[],
    prev_hashes TEXT[], hashes TEXT[]
) RETURNS TABLE (id BIGINT, head TEXT)
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    current_head TEXT;
BEGIN
    PERFORM pg_advisory_xact_lock(42);
    SELECT e.hash INTO current_head FROM audit_events e ORDER BY e.id DESC LIMIT 1;
    IF coalesce(current_head, '') <> expected_head THEN
        RETURN QUERY SELECT NULL::BIGINT, coalesce(current_head, '');
        RETURN;
    END IF;
    RETURN QUERY
        INSERT INTO audit_events AS e
            (request_id, event_id, ts, actor, action, decision, payload, prev_hash, hash)
        SELECT u.request_id, u.event_id, u.ts, u.actor, u.action, u.decision,
               u.payload, u.prev_hash, u.hash
        FROM unnest(request_ids, event_ids, tss, actors, actions, decisions,
                    payloads, prev_hashes, hashes)
             WITH ORDINALITY AS u(request_id, event_id, ts, actor, action, decision,
                                  payload, prev_hash, hash, n)
        ORDER BY u.n
        RETURNING e.id, e.hash;
END;
$$;

COMMIT;
