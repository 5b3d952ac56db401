//! PostgreSQL audit store (`PG_DSN`), the production backend.
//!
//! Every batch is one transaction that takes `pg_advisory_xact_lock(42)`
//! before reading the chain head, so any number of verifier processes can
//! append to one database and the chain stays linear. Normally that
//! transaction is a single call of `casf_audit_append` (from `sql/init.sql`)
//! on the writer's own connection: one round trip, chained from the head
//! this process last wrote; if another writer moved the head, the call
//! appends nothing and says where the head is, and the batch is re-chained.
//! Databases initialised without that function get the same transaction as
//! separate statements (five round trips). The payload is stored
//! as JSONB, which reorders keys and reformats numbers; hashes are therefore
//! computed over the canonical form, and verification recanonicalises what
//! JSONB gives back (`payload::text`).
//!
//! `serve` does not create the schema: `casf-verifier migrate` does
//! ([`SCHEMA`]), and [`PostgresAuditLog::open`] refuses a database without it.

use std::time::Duration;

use async_trait::async_trait;
use sqlx::postgres::{PgConnectOptions, PgConnection, PgPool, PgPoolOptions, PgRow};
use sqlx::{ConnectOptions, Connection, Postgres, QueryBuilder, Row};
use tokio::sync::Mutex;
use tokio_stream::StreamExt;

use super::checkpoint::Head;
use super::pg_dsn::PgDsn;
use super::scan::{BATCH, ChainSource, RawRow, ReadError};
use super::{AppendReceipt, AuditError, AuditLog, EventFilter, NewEvent, StoredEvent, chain};
use crate::config::Redactor;

/// The schema, applied by `casf-verifier migrate`; idempotent.
pub const SCHEMA: &str = include_str!("../../sql/init.sql");

/// The key of the advisory lock that serialises writers (guide §8).
pub const WRITERS_LOCK: i64 = 42;
/// A few connections for probes and reads (`audit verify`, `digest`); the
/// audit writer keeps a connection of its own outside the pool.
const POOL_SIZE: u32 = 4;
/// How long to wait for a connection, so a dead server fails a batch (and
/// `/healthz`) within the guide's 2 s budget instead of hanging.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(2);
/// Server-side bound on one statement, the advisory-lock wait included.
const STATEMENT_TIMEOUT: &str = "5s";
/// A session that stalls inside a transaction (a frozen or partitioned
/// verifier) is ended by the server, which releases the writers' lock.
const IDLE_IN_TRANSACTION_TIMEOUT: &str = "10s";

/// Calls of `casf_audit_append` per batch before falling back to the
/// transaction that holds the lock across its round trips. A miss costs one
/// round trip and no fsync; only a writer racing another writer misses twice.
const OPTIMISTIC_ATTEMPTS: usize = 3;
/// The one-round-trip append, if this database has it.
pub const APPEND_FUNCTION: &str =
    "casf_audit_append(text,text[],uuid[],text[],text[],text[],text[],jsonb[],text[],text[])";

const COLUMNS: &str = "id, request_id, event_id::text AS event_id, ts, actor, action, decision, \
                       payload::text AS payload, prev_hash, hash";

pub struct PostgresAuditLog {
    pool: PgPool,
    /// For [`AuditLog::ping`]'s direct connection attempt.
    options: PgConnectOptions,
    /// Masks the DSN's password out of every error this store reports.
    redactor: Redactor,
    /// Whether the database has [`APPEND_FUNCTION`] (checked at open).
    one_round_trip: bool,
    appender: Mutex<Appender>,
}

/// The audit writer's own connection, kept outside the pool so that an
/// append pays no acquire-time ping, and the head it last committed.
/// Both are dropped on any error: the outcome of that batch is unknown.
#[derive(Default)]
struct Appender {
    conn: Option<PgConnection>,
    head: Option<String>,
}

/// What one call of `casf_audit_append` did.
enum Attempt {
    Appended(Vec<AppendReceipt>),
    /// Another writer moved the head; nothing was written.
    HeadMoved(String),
}

impl PostgresAuditLog {
    /// Connects and checks that the schema is in place.
    pub async fn open(dsn: &PgDsn) -> Result<Self, AuditError> {
        let mut log = Self::connect(dsn).await?;
        log.check_database().await?;
        log.one_round_trip = log.has_append_function().await?;
        Ok(log)
    }

    /// Connects and applies [`SCHEMA`] (`casf-verifier migrate`).
    pub async fn migrate(dsn: &PgDsn) -> Result<Self, AuditError> {
        let mut log = Self::connect(dsn).await?;
        log.check_encoding().await?;
        let mut conn = log.pool.acquire().await.map_err(|e| log.error(e))?;
        if let Err(error) = sqlx::raw_sql(SCHEMA).execute(&mut *conn).await {
            // The script's own transaction may be left aborted on this session.
            conn.close_on_drop();
            return Err(log.error(error));
        }
        drop(conn);
        log.check_database().await?;
        log.one_round_trip = log.has_append_function().await?;
        Ok(log)
    }

    async fn connect(dsn: &PgDsn) -> Result<Self, AuditError> {
        // Parsed once, in `config`; the redactor is for the driver's and the
        // server's error text.
        let redactor = Redactor::new(dsn.password_forms());
        let options: PgConnectOptions = dsn
            .options()
            .clone()
            .application_name("casf-verifier")
            .options([
                ("statement_timeout", STATEMENT_TIMEOUT),
                (
                    "idle_in_transaction_session_timeout",
                    IDLE_IN_TRANSACTION_TIMEOUT,
                ),
                // The head must be read on a snapshot taken after the
                // writers' lock; a server default of REPEATABLE READ would
                // take it before. (The space is escaped for the startup
                // packet's `options`, which sqlx passes through as is.)
                ("default_transaction_isolation", r"read\ committed"),
            ]);
        let pool = PgPoolOptions::new()
            .max_connections(POOL_SIZE)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            // Connections killed by a server restart are found and replaced
            // on the next acquire, so the store recovers by itself.
            .test_before_acquire(true)
            .connect_lazy_with(options.clone());
        let log = PostgresAuditLog {
            pool,
            options,
            redactor,
            one_round_trip: false,
            appender: Mutex::default(),
        };
        log.ping().await?;
        Ok(log)
    }

    async fn has_append_function(&self) -> Result<bool, AuditError> {
        let found: bool = sqlx::query_scalar("SELECT to_regprocedure($1) IS NOT NULL")
            .bind(APPEND_FUNCTION)
            .fetch_one(&self.pool)
            .await
            .map_err(|e| self.error(e))?;
        if !found {
            tracing::warn!(
                "PostgreSQL audit schema has no casf_audit_append(); appends take five round \
                 trips each: run `casf-verifier migrate` to add it"
            );
        }
        Ok(found)
    }

    /// JSONB round trips need a UTF-8 database, and the table must exist.
    async fn check_database(&self) -> Result<(), AuditError> {
        self.check_encoding().await?;
        let probe = format!("SELECT {COLUMNS} FROM audit_events LIMIT 0");
        match sqlx::query(&probe).execute(&self.pool).await {
            Ok(_) => Ok(()),
            Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("42P01") => {
                Err(AuditError::Unavailable(
                    "table audit_events does not exist: run `casf-verifier migrate` \
                     (or psql -f sql/init.sql) before the first start"
                        .into(),
                ))
            }
            Err(e) => Err(self.error(e)),
        }
    }

    async fn check_encoding(&self) -> Result<(), AuditError> {
        let encoding: String = sqlx::query_scalar("SELECT current_setting('server_encoding')")
            .fetch_one(&self.pool)
            .await
            .map_err(|e| self.error(e))?;
        if encoding != "UTF8" {
            return Err(AuditError::Unavailable(format!(
                "database encoding is {encoding}; the audit trail needs UTF8"
            )));
        }
        Ok(())
    }

    /// Appends on the writer's connection, opening it if needed.
    async fn append_with(
        &self,
        appender: &mut Appender,
        events: &[NewEvent],
    ) -> Result<Vec<AppendReceipt>, AuditError> {
        let conn = match &mut appender.conn {
            Some(conn) => conn,
            None => appender.conn.insert(self.connect_direct().await?),
        };
        // An unknown head is guessed as genesis: a wrong guess costs one
        // round trip and returns the real head.
        let mut expected = appender.head.take().unwrap_or_default();
        let mut links = chain::link(&expected, events);
        if self.one_round_trip {
            for _ in 0..OPTIMISTIC_ATTEMPTS {
                match Self::append_if_head(conn, &expected, events, &links).await {
                    Ok(Attempt::Appended(receipts)) => {
                        appender.head = receipts.last().map(|r| r.hash.clone());
                        return Ok(receipts);
                    }
                    Ok(Attempt::HeadMoved(head)) => {
                        chain::rechain(&mut links, &head, events);
                        expected = head;
                    }
                    Err(error) => return Err(self.error(error)),
                }
            }
        }
        let mut tx = conn.begin().await.map_err(|e| self.error(e))?;
        // On error the transaction is dropped, which rolls it back.
        let receipts = Self::append_in_tx(&mut tx, events, links)
            .await
            .map_err(|e| self.error(e))?;
        // A failed COMMIT is reported as a failure even though the outcome is
        // unknown: a row that exists but was reported missing is harmless, a
        // row reported written that is not would be a silent loss.
        tx.commit().await.map_err(|e| self.error(e))?;
        appender.head = receipts.last().map(|r| r.hash.clone());
        Ok(receipts)
    }

    /// One call of `casf_audit_append`, committed on return (autocommit).
    /// The rows stream back before the commit, but sqlx reads to the end of
    /// the exchange, so a failed commit is an error here, not a receipt.
    async fn append_if_head(
        conn: &mut PgConnection,
        expected_head: &str,
        events: &[NewEvent],
        links: &[chain::Link],
    ) -> Result<Attempt, sqlx::Error> {
        let column = |field: fn(&NewEvent) -> &str| events.iter().map(field).collect::<Vec<_>>();
        let link_column =
            |field: fn(&chain::Link) -> &str| links.iter().map(field).collect::<Vec<_>>();
        let mut rows: Vec<(Option<i64>, String)> = sqlx::query_as(
            "SELECT id, head FROM casf_audit_append($1, $2, $3::uuid[], $4, $5, $6, $7, $8::jsonb[], $9, $10)",
        )
        .bind(expected_head)
        .bind(column(|e| &e.request_id))
        .bind(column(|e| &e.event_id))
        .bind(column(|e| &e.ts))
        .bind(column(|e| &e.actor))
        .bind(column(|e| &e.action))
        .bind(column(|e| &e.decision))
        .bind(link_column(|l| &l.payload))
        .bind(link_column(|l| &l.prev_hash))
        .bind(link_column(|l| &l.hash))
        .fetch_all(&mut *conn)
        .await?;
        if let [(None, head)] = rows.as_slice() {
            return Ok(Attempt::HeadMoved(head.clone()));
        }
        rows.sort_unstable_by_key(|(id, _)| *id);
        let in_chain_order = rows.len() == links.len()
            && rows
                .iter()
                .zip(links)
                .all(|((id, stored), link)| id.is_some() && *stored == link.hash);
        if !in_chain_order {
            // Committed already: say so loudly rather than hand out wrong receipts.
            return Err(sqlx::Error::Protocol(
                "casf_audit_append returned rows out of chain order".into(),
            ));
        }
        Ok(Attempt::Appended(
            rows.into_iter()
                .map(|(id, hash)| AppendReceipt {
                    id: id.unwrap_or_default(),
                    hash,
                })
                .collect(),
        ))
    }

    /// A connection of the writer's own, bounded like a pool acquire.
    async fn connect_direct(&self) -> Result<PgConnection, AuditError> {
        tokio::time::timeout(ACQUIRE_TIMEOUT, PgConnection::connect_with(&self.options))
            .await
            .map_err(|_| self.error(sqlx::Error::PoolTimedOut))?
            .map_err(|e| self.error(e))
    }

    /// The same append as separate statements under the writers' lock,
    /// re-chaining `links` (already rendered for `events`) from the head
    /// read under it.
    async fn append_in_tx(
        conn: &mut sqlx::PgConnection,
        events: &[NewEvent],
        mut links: Vec<chain::Link>,
    ) -> Result<Vec<AppendReceipt>, sqlx::Error> {
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(WRITERS_LOCK)
            .execute(&mut *conn)
            .await?;
        let head: Option<String> =
            sqlx::query_scalar("SELECT hash FROM audit_events ORDER BY id DESC LIMIT 1")
                .fetch_optional(&mut *conn)
                .await?;
        chain::rechain(&mut links, head.as_deref().unwrap_or(""), events);
        let mut insert: QueryBuilder<Postgres> = QueryBuilder::new(
            "INSERT INTO audit_events (request_id, event_id, ts, actor, action, decision, payload, prev_hash, hash) ",
        );
        insert.push_values(events.iter().zip(&links), |mut row, (event, link)| {
            row.push_bind(&event.request_id)
                .push_bind(&event.event_id)
                .push_unseparated("::uuid")
                .push_bind(&event.ts)
                .push_bind(&event.actor)
                .push_bind(&event.action)
                .push_bind(&event.decision)
                .push_bind(&link.payload)
                .push_unseparated("::jsonb")
                .push_bind(&link.prev_hash)
                .push_bind(&link.hash);
        });
        insert.push(" RETURNING id");
        let mut ids: Vec<i64> = insert.build_query_scalar().fetch_all(&mut *conn).await?;
        // Ids come from one sequence in VALUES order; RETURNING order is not promised.
        ids.sort_unstable();
        Ok(ids
            .into_iter()
            .zip(links)
            .map(|(id, link)| AppendReceipt {
                id,
                hash: link.hash,
            })
            .collect())
    }

    /// Classifies a driver error, with the password masked out.
    fn error(&self, error: sqlx::Error) -> AuditError {
        let text = |e: &dyn std::fmt::Display| self.redactor.redact(&format!("PostgreSQL: {e}"));
        match &error {
            sqlx::Error::PoolTimedOut => AuditError::Unavailable(format!(
                "no connection to PostgreSQL within {}s",
                ACQUIRE_TIMEOUT.as_secs()
            )),
            sqlx::Error::Database(db) => match db.code().as_deref() {
                // query_canceled (statement_timeout), lock_not_available.
                Some("57014" | "55P03") => AuditError::Timeout,
                // Connection exceptions, server shutting down or starting,
                // out of resources, bad credentials: the store is not there.
                Some(code)
                    if code.starts_with("08")
                        || code.starts_with("57")
                        || code.starts_with("53")
                        || code.starts_with("28") =>
                {
                    AuditError::Unavailable(text(&error))
                }
                _ => AuditError::Rejected(text(&error)),
            },
            sqlx::Error::ColumnDecode { .. }
            | sqlx::Error::ColumnNotFound(_)
            | sqlx::Error::Decode(_)
            | sqlx::Error::TypeNotFound { .. } => AuditError::Rejected(text(&error)),
            _ => AuditError::Unavailable(text(&error)),
        }
    }
}

#[async_trait]
impl AuditLog for PostgresAuditLog {
    fn backend(&self) -> &'static str {
        "postgres"
    }

    async fn append_batch(&self, events: &[NewEvent]) -> Result<Vec<AppendReceipt>, AuditError> {
        if events.is_empty() {
            return Ok(Vec::new());
        }
        let mut appender = self.appender.lock().await;
        let result = self.append_with(&mut appender, events).await;
        if result.is_err() {
            *appender = Appender::default();
        }
        result
    }

    async fn page(
        &self,
        filter: &EventFilter,
        after_id: i64,
        limit: u32,
    ) -> Result<Vec<StoredEvent>, AuditError> {
        let limit = i64::from(limit);
        let rows = match &filter.ts_window {
            Some((from, to)) => {
                // Bytewise comparison, whatever the database's default collation.
                sqlx::query(&format!(
                    "SELECT {COLUMNS} FROM audit_events WHERE id > $1 \
                     AND ts COLLATE \"C\" >= $2 AND ts COLLATE \"C\" < $3 ORDER BY id LIMIT $4"
                ))
                .bind(after_id)
                .bind(from)
                .bind(to)
                .bind(limit)
                .fetch_all(&self.pool)
                .await
            }
            None => {
                sqlx::query(&format!(
                    "SELECT {COLUMNS} FROM audit_events WHERE id > $1 ORDER BY id LIMIT $2"
                ))
                .bind(after_id)
                .bind(limit)
                .fetch_all(&self.pool)
                .await
            }
        }
        .map_err(|e| self.error(e))?;
        rows.iter()
            .map(|row| stored_event(row).map_err(|e| self.error(e)))
            .collect()
    }

    async fn hash_before(&self, id: i64) -> Result<Option<String>, AuditError> {
        sqlx::query_scalar("SELECT hash FROM audit_events WHERE id < $1 ORDER BY id DESC LIMIT 1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await
            .map_err(|e| self.error(e))
    }

    async fn present_event_ids(
        &self,
        event_ids: &[String],
    ) -> Result<std::collections::HashSet<String>, AuditError> {
        // Read on the pool, not the appender's connection: this is a plain
        // read, and `event_id` is UNIQUE, so no lock is needed for it to stay
        // true (only this process appends these ids).
        let present: Vec<String> = sqlx::query_scalar(
            "SELECT event_id::text FROM audit_events WHERE event_id = ANY($1::text[]::uuid[])",
        )
        .bind(event_ids)
        .fetch_all(&self.pool)
        .await
        .map_err(|e| self.error(e))?;
        Ok(present.into_iter().collect())
    }

    /// `SELECT 1` on an idle pooled connection if there is one, else on one
    /// direct connection attempt: the pool retries a refused connection
    /// until its acquire timeout, and a probe should report a server that is
    /// down at once (guide §6). A pooled connection that fails is closed and
    /// does not decide the answer: after an outage the pool still holds
    /// connections the restart cut, and the server may well be back.
    async fn ping(&self) -> Result<(), AuditError> {
        while let Some(mut conn) = self.pool.try_acquire() {
            if sqlx::query("SELECT 1").execute(&mut *conn).await.is_ok() {
                return Ok(());
            }
            conn.close_on_drop();
        }
        let mut conn = self.connect_direct().await?;
        let result = sqlx::query("SELECT 1").execute(&mut conn).await;
        let _ = conn.close().await;
        result.map(drop).map_err(|e| self.error(e))
    }
}

/// The audit commands' view of the database: every session read-only
/// (`default_transaction_read_only`), refusing a database without the table.
/// Rows stream page by page (one short query each, so no snapshot is held
/// for the whole walk), as they arrive.
pub struct PostgresChainReader {
    pool: PgPool,
    redactor: Redactor,
    /// `database on host:port`, for messages (never the password).
    shown: String,
}

/// Rows per query.
const READ_PAGE: i64 = 50_000;

impl PostgresChainReader {
    pub async fn open(dsn: &PgDsn) -> Result<Self, ReadError> {
        let redactor = Redactor::new(dsn.password_forms());
        let options: PgConnectOptions = dsn
            .options()
            .clone()
            .application_name("casf-verifier audit")
            .options([("default_transaction_read_only", "on")])
            // Pages of a long walk are not slow statements worth a warning.
            .disable_statement_logging();
        let shown = format!(
            "PostgreSQL database {:?} on {}:{}",
            options.get_database().unwrap_or(options.get_username()),
            options.get_host(),
            options.get_port()
        );
        // One direct connection first: a pool retries a refused connection
        // until its timeout and then reports only the timeout.
        let mut probe = tokio::time::timeout(ACQUIRE_TIMEOUT, PgConnection::connect_with(&options))
            .await
            .map_err(|_| {
                ReadError::Unreachable(format!(
                    "{shown}: no connection within {}s",
                    ACQUIRE_TIMEOUT.as_secs()
                ))
            })?
            .map_err(|e| ReadError::Unreachable(redactor.redact(&format!("{shown}: {e}"))))?;
        let has_table = sqlx::query_scalar("SELECT to_regclass('audit_events') IS NOT NULL")
            .fetch_one(&mut probe)
            .await;
        let _ = probe.close().await;
        let reader = PostgresChainReader {
            pool: PgPoolOptions::new()
                .max_connections(2)
                .acquire_timeout(ACQUIRE_TIMEOUT)
                .connect_lazy_with(options),
            redactor,
            shown,
        };
        let has_table: bool = has_table.map_err(|e| reader.error(e))?;
        if !has_table {
            return Err(ReadError::NoSchema(reader.shown.clone()));
        }
        Ok(reader)
    }

    fn error(&self, error: sqlx::Error) -> ReadError {
        let text = self.redactor.redact(&format!("{}: {error}", self.shown));
        match &error {
            sqlx::Error::PoolTimedOut | sqlx::Error::Io(_) | sqlx::Error::Tls(_) => {
                ReadError::Unreachable(text)
            }
            sqlx::Error::Database(db)
                if db.code().is_some_and(|code| {
                    code.starts_with("08") || code.starts_with("57") || code.starts_with("28")
                }) =>
            {
                ReadError::Unreachable(text)
            }
            _ => ReadError::Read(text),
        }
    }
}

fn raw_row(row: &PgRow) -> Result<RawRow, sqlx::Error> {
    Ok(RawRow {
        id: row.try_get(0)?,
        request_id: row.try_get(1)?,
        event_id: row.try_get(2)?,
        ts: row.try_get(3)?,
        actor: row.try_get(4)?,
        action: row.try_get(5)?,
        decision: row.try_get(6)?,
        payload: row.try_get(7)?,
        prev_hash: row.try_get(8)?,
        hash: row.try_get(9)?,
    })
}

#[async_trait]
impl ChainSource for PostgresChainReader {
    async fn stream(
        &self,
        filter: &EventFilter,
        out: tokio::sync::mpsc::Sender<Vec<RawRow>>,
    ) -> Result<(), ReadError> {
        let sql = match &filter.ts_window {
            // Bytewise comparison, whatever the database's default collation.
            Some(_) => format!(
                "SELECT {COLUMNS} FROM audit_events WHERE id > $1 \
                 AND ts COLLATE \"C\" >= $3 AND ts COLLATE \"C\" < $4 ORDER BY id LIMIT $2"
            ),
            None => {
                format!("SELECT {COLUMNS} FROM audit_events WHERE id > $1 ORDER BY id LIMIT $2")
            }
        };
        let mut after_id = 0i64;
        loop {
            let mut query = sqlx::query(&sql).bind(after_id).bind(READ_PAGE);
            if let Some((from, to)) = &filter.ts_window {
                query = query.bind(from).bind(to);
            }
            let mut rows = query.fetch(&self.pool);
            let mut batch = Vec::with_capacity(BATCH);
            let mut read = 0;
            while let Some(row) = rows.next().await.transpose().map_err(|e| self.error(e))? {
                let raw = raw_row(&row).map_err(|e| self.error(e))?;
                after_id = raw.id;
                read += 1;
                batch.push(raw);
                if batch.len() == BATCH {
                    let full = std::mem::replace(&mut batch, Vec::with_capacity(BATCH));
                    if out.send(full).await.is_err() {
                        return Ok(());
                    }
                }
            }
            if !batch.is_empty() && out.send(batch).await.is_err() {
                return Ok(());
            }
            if read < READ_PAGE {
                return Ok(());
            }
        }
    }

    async fn hash_before(&self, id: i64) -> Result<Option<String>, ReadError> {
        sqlx::query_scalar("SELECT hash FROM audit_events WHERE id < $1 ORDER BY id DESC LIMIT 1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await
            .map_err(|e| self.error(e))
    }

    async fn count(&self, filter: &EventFilter) -> Result<u64, ReadError> {
        let count: i64 = match &filter.ts_window {
            Some((from, to)) => sqlx::query_scalar(
                "SELECT COUNT(*) FROM audit_events WHERE ts COLLATE \"C\" >= $1 AND ts COLLATE \"C\" < $2",
            )
            .bind(from)
            .bind(to)
            .fetch_one(&self.pool)
            .await,
            None => sqlx::query_scalar("SELECT COUNT(*) FROM audit_events")
                .fetch_one(&self.pool)
                .await,
        }
        .map_err(|e| self.error(e))?;
        Ok(count.max(0) as u64)
    }

    async fn head_since(&self, since: &Head) -> Result<Option<Head>, ReadError> {
        // Rows never change once written (triggers refuse it), so the anchor
        // read before the head still holds when the head is read.
        if since.last_id != 0 {
            let anchor: Option<String> =
                sqlx::query_scalar("SELECT hash FROM audit_events WHERE id = $1")
                    .bind(since.last_id)
                    .fetch_optional(&self.pool)
                    .await
                    .map_err(|e| self.error(e))?;
            if anchor.as_deref() != Some(since.last_hash.as_str()) {
                return Ok(None);
            }
        }
        let row: Option<(i64, String, i64)> = sqlx::query_as(
            "SELECT id, hash, \
             (SELECT COUNT(*) FROM audit_events WHERE id > $1 AND id <= head.id) \
             FROM audit_events AS head ORDER BY id DESC LIMIT 1",
        )
        .bind(since.last_id)
        .fetch_optional(&self.pool)
        .await
        .map_err(|e| self.error(e))?;
        Ok(row.map(|(last_id, last_hash, added)| Head {
            last_id,
            last_hash,
            count: since.count + added.max(0) as u64,
        }))
    }

    async fn head(&self) -> Result<Head, ReadError> {
        let row: Option<(i64, String, i64)> = sqlx::query_as(super::sqlite::HEAD_SQL)
            .fetch_optional(&self.pool)
            .await
            .map_err(|e| self.error(e))?;
        Ok(match row {
            Some((last_id, last_hash, count)) => Head {
                last_id,
                last_hash,
                count: count.max(0) as u64,
            },
            None => Head::EMPTY,
        })
    }
}

fn stored_event(row: &PgRow) -> Result<StoredEvent, sqlx::Error> {
    let payload_text: String = row.try_get("payload")?;
    // JSONB text always parses; should it not, keep the text as a JSON
    // string so the recomputed hash fails instead of the whole read.
    let payload =
        serde_json::from_str(&payload_text).unwrap_or(serde_json::Value::String(payload_text));
    Ok(StoredEvent {
        id: row.try_get("id")?,
        event: NewEvent {
            request_id: row.try_get("request_id")?,
            event_id: row.try_get("event_id")?,
            ts: row.try_get("ts")?,
            actor: row.try_get("actor")?,
            action: row.try_get("action")?,
            decision: row.try_get("decision")?,
            payload,
        },
        prev_hash: row.try_get("prev_hash")?,
        hash: row.try_get("hash")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn errors_are_classified_and_never_carry_the_password() {
        let dsn = "postgres://casf:hunter2@127.0.0.1:1/casf";
        let parsed = PgDsn::parse(dsn).unwrap();
        let options = parsed.options().clone();
        let log = PostgresAuditLog {
            pool: PgPoolOptions::new().connect_lazy_with(options.clone()),
            options,
            redactor: Redactor::new(parsed.password_forms()),
            one_round_trip: true,
            appender: Mutex::default(),
        };
        let leaky = log.error(sqlx::Error::Configuration(format!("bad DSN {dsn}").into()));
        assert!(matches!(leaky, AuditError::Unavailable(_)));
        assert!(!leaky.to_string().contains("hunter2"), "{leaky}");
        assert!(leaky.to_string().contains("PostgreSQL"), "{leaky}");
        assert!(matches!(
            log.error(sqlx::Error::PoolTimedOut),
            AuditError::Unavailable(_)
        ));
        assert!(matches!(
            log.error(sqlx::Error::ColumnNotFound("hash".into())),
            AuditError::Rejected(_)
        ));
    }
}
