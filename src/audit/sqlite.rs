//! SQLite audit store: the embedded default (`CASF_AUDIT_SQLITE`).
//!
//! WAL with `synchronous=FULL`, so a decision's audit row is durable once its
//! batch commits. `BEGIN IMMEDIATE` takes the write lock before the head is
//! read, which keeps the chain linear even if two processes share the file.
//! Triggers make the table append-only to casual mistakes; the hash chain is
//! what catches deliberate tampering.
//!
//! One driver, rusqlite, for every connection to the file, so they all get
//! the same pragmas and the same locking. Appends run synchronously on the
//! audit writer's own thread; reads and probes run on the blocking pool
//! through a second connection (WAL lets it read while a batch commits).
//!
//! Unlike `sql/init.sql`, `event_id` and `hash` carry no UNIQUE index: their
//! random keys dirtied a page per row per index and cut group-commit
//! throughput about 2.5x (auditbench, 128 writers). The chain already fails
//! verification on a duplicated or reordered row.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use rusqlite::OptionalExtension;

use super::checkpoint::Head;
use super::scan::{BATCH, ChainSource, RawRow, ReadError};
use super::{AppendReceipt, AuditError, AuditLog, EventFilter, NewEvent, StoredEvent, chain};

const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS audit_events (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    request_id  TEXT NOT NULL,
    event_id    TEXT NOT NULL,
    ts          TEXT NOT NULL,
    actor       TEXT NOT NULL,
    action      TEXT NOT NULL,
    decision    TEXT NOT NULL,
    payload     TEXT NOT NULL,
    prev_hash   TEXT NOT NULL,
    hash        TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS audit_events_ts ON audit_events (ts);
CREATE INDEX IF NOT EXISTS audit_events_request_id ON audit_events (request_id);
CREATE TRIGGER IF NOT EXISTS audit_events_no_update BEFORE UPDATE ON audit_events
BEGIN SELECT RAISE(ABORT, 'audit_events is append-only'); END;
CREATE TRIGGER IF NOT EXISTS audit_events_no_delete BEFORE DELETE ON audit_events
BEGIN SELECT RAISE(ABORT, 'audit_events is append-only'); END;
"#;

/// How long a write waits for another connection's lock.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

pub struct SqliteAuditLog {
    /// Appends: the audit writer's connection, used on its thread alone.
    /// (Through an async driver every statement of a batch was a round trip
    /// to a worker thread, a quarter of the verifier's CPU at load.)
    writer: Mutex<Option<rusqlite::Connection>>,
    /// Reads and probes (`/healthz`, the writer's probe, pages), opened
    /// lazily and reopened after an error. Its own connection, so that a
    /// probe never waits behind a batch's fsync.
    reader: Arc<Mutex<Option<rusqlite::Connection>>>,
    path: PathBuf,
}

impl SqliteAuditLog {
    /// Opens (creating file, folder and table if needed) the audit database.
    pub async fn open(path: &Path) -> Result<Self, AuditError> {
        let owned = path.to_owned();
        let writer = tokio::task::spawn_blocking(move || -> Result<_, AuditError> {
            if let Some(parent) = owned.parent().filter(|p| !p.as_os_str().is_empty()) {
                std::fs::create_dir_all(parent).map_err(|e| {
                    AuditError::Unavailable(format!("cannot create {}: {e}", parent.display()))
                })?;
            }
            let conn = connect(&owned, true).map_err(unavailable)?;
            conn.execute_batch(SCHEMA).map_err(unavailable)?;
            Ok(conn)
        })
        .await
        .map_err(|e| AuditError::Unavailable(e.to_string()))??;
        Ok(SqliteAuditLog {
            writer: Mutex::new(Some(writer)),
            reader: Arc::default(),
            path: path.to_owned(),
        })
    }

    /// Runs `read` on the reader connection, on the blocking pool.
    async fn read<T: Send + 'static>(
        &self,
        read: impl FnOnce(&rusqlite::Connection) -> rusqlite::Result<T> + Send + 'static,
    ) -> Result<T, AuditError> {
        let (reader, path) = (self.reader.clone(), self.path.clone());
        tokio::task::spawn_blocking(move || {
            let mut slot = reader
                .lock()
                .map_err(|_| AuditError::Unavailable("SQLite reader lock poisoned".into()))?;
            let conn = match &mut *slot {
                Some(conn) => conn,
                // Never creates the file: a database that vanished is
                // reported, not silently replaced by an empty one.
                None => slot.insert(connect(&path, false).map_err(unavailable)?),
            };
            let result = read(conn);
            if result.is_err() {
                *slot = None;
            }
            result.map_err(unavailable)
        })
        .await
        .map_err(|e| AuditError::Unavailable(e.to_string()))?
    }

    /// One batch, one transaction. `BEGIN IMMEDIATE` takes the write lock
    /// before the head is read, so the chain stays linear even with another
    /// process on the file. A transaction dropped on error rolls back.
    fn append_in_tx(
        conn: &mut rusqlite::Connection,
        events: &[NewEvent],
    ) -> rusqlite::Result<Vec<AppendReceipt>> {
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let head: Option<String> = tx
            .query_row(
                "SELECT hash FROM audit_events ORDER BY id DESC LIMIT 1",
                [],
                |row| row.get(0),
            )
            .optional()?;
        let links = chain::link(head.as_deref().unwrap_or(""), events);
        let mut receipts = Vec::with_capacity(events.len());
        {
            let mut insert = tx.prepare_cached(
                "INSERT INTO audit_events (request_id, event_id, ts, actor, action, decision, payload, prev_hash, hash) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            )?;
            for (event, link) in events.iter().zip(links) {
                let id = insert.insert(rusqlite::params![
                    event.request_id,
                    event.event_id,
                    event.ts,
                    event.actor,
                    event.action,
                    event.decision,
                    link.payload,
                    link.prev_hash,
                    link.hash,
                ])?;
                receipts.push(AppendReceipt {
                    id,
                    hash: link.hash,
                });
            }
        }
        tx.commit()?;
        Ok(receipts)
    }
}

/// Every connection to the file, writer or reader: WAL with
/// `synchronous=FULL` (a committed batch is on disk), and a busy timeout
/// rather than an instant SQLITE_BUSY when another process holds the lock.
fn connect(path: &Path, create: bool) -> rusqlite::Result<rusqlite::Connection> {
    use rusqlite::OpenFlags;
    let mut flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    if create {
        flags |= OpenFlags::SQLITE_OPEN_CREATE;
    }
    let conn = rusqlite::Connection::open_with_flags(path, flags)?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    Ok(conn)
}

fn unavailable(error: rusqlite::Error) -> AuditError {
    AuditError::Unavailable(error.to_string())
}

/// An append's failure: the batch's own fault (retried event by event by the
/// writer), a lock held too long, or a file that cannot be written now.
fn classify(error: rusqlite::Error) -> AuditError {
    let code = match &error {
        rusqlite::Error::SqliteFailure(failure, _) => failure.extended_code & 0xff,
        rusqlite::Error::ToSqlConversionFailure(_) => {
            return AuditError::Rejected(error.to_string());
        }
        _ => return AuditError::Unavailable(error.to_string()),
    };
    match code {
        // SQLITE_BUSY, SQLITE_LOCKED: still locked after the busy timeout.
        5 | 6 => AuditError::Timeout,
        // SQLITE_ERROR, TOOBIG, CONSTRAINT, MISMATCH, RANGE: this batch.
        1 | 18 | 19 | 20 | 25 => AuditError::Rejected(error.to_string()),
        _ => AuditError::Unavailable(error.to_string()),
    }
}

#[async_trait]
impl AuditLog for SqliteAuditLog {
    fn backend(&self) -> &'static str {
        "sqlite"
    }

    /// Blocks its thread for the batch's I/O (fsync included): meant for
    /// the audit writer's own thread, which does nothing else.
    async fn append_batch(&self, events: &[NewEvent]) -> Result<Vec<AppendReceipt>, AuditError> {
        if events.is_empty() {
            return Ok(Vec::new());
        }
        let mut writer = self
            .writer
            .lock()
            .map_err(|_| AuditError::Unavailable("SQLite writer lock poisoned".into()))?;
        let conn = match &mut *writer {
            Some(conn) => conn,
            None => writer.insert(connect(&self.path, true).map_err(unavailable)?),
        };
        let result = Self::append_in_tx(conn, events).map_err(classify);
        if matches!(result, Err(AuditError::Unavailable(_))) {
            // Reopen next time rather than trust a connection that failed.
            *writer = None;
        }
        result
    }

    async fn page(
        &self,
        filter: &EventFilter,
        after_id: i64,
        limit: u32,
    ) -> Result<Vec<StoredEvent>, AuditError> {
        let (from, to) = match &filter.ts_window {
            Some((from, to)) => (from.as_str(), to.as_str()),
            None => ("", "\u{10FFFF}"),
        };
        let (from, to) = (from.to_owned(), to.to_owned());
        self.read(move |conn| {
            let mut statement = conn.prepare_cached(&format!(
                "SELECT {READ_COLUMNS} FROM audit_events WHERE id > ?1 AND ts >= ?2 AND ts < ?3 \
                 ORDER BY id LIMIT ?4"
            ))?;
            let rows = statement.query_map(
                rusqlite::params![after_id, from, to, i64::from(limit)],
                raw_row,
            )?;
            rows.map(|row| row.map(stored_event)).collect()
        })
        .await
    }

    async fn hash_before(&self, id: i64) -> Result<Option<String>, AuditError> {
        self.read(move |conn| {
            conn.query_row(
                "SELECT hash FROM audit_events WHERE id < ?1 ORDER BY id DESC LIMIT 1",
                [id],
                |row| row.get(0),
            )
            .optional()
        })
        .await
    }

    async fn ping(&self) -> Result<(), AuditError> {
        self.read(|conn| conn.query_row("SELECT 1", [], |_| Ok(())))
            .await
    }
}

fn stored_event(row: RawRow) -> StoredEvent {
    // A payload that no longer parses is itself tampering: keep it as a JSON
    // string so the recomputed hash fails instead of the whole read.
    let payload =
        serde_json::from_str(&row.payload).unwrap_or(serde_json::Value::String(row.payload));
    StoredEvent {
        id: row.id,
        event: NewEvent {
            request_id: row.request_id,
            event_id: row.event_id,
            ts: row.ts,
            actor: row.actor,
            action: row.action,
            decision: row.decision,
            payload,
        },
        prev_hash: row.prev_hash,
        hash: row.hash,
    }
}

/// The audit commands' view of the file: read-only, never creating it (nor
/// its folder). Rows are read through rusqlite on a blocking thread, page by
/// page, so no read transaction stays open for long against a live writer.
/// (A WAL database's own `-wal` and `-shm` files may still be created by
/// SQLite, as any reader needs them to share the file with a writer.)
pub struct SqliteChainReader {
    path: PathBuf,
    /// The absolute path, for messages.
    shown: String,
}

/// Rows per read statement (each its own short read transaction).
const READ_PAGE: i64 = 50_000;

const READ_COLUMNS: &str =
    "id, request_id, event_id, ts, actor, action, decision, payload, prev_hash, hash";

impl SqliteChainReader {
    /// Refuses a missing file and a file without the audit table.
    pub async fn open(path: &Path) -> Result<Self, ReadError> {
        let shown = std::path::absolute(path)
            .unwrap_or_else(|_| path.to_owned())
            .display()
            .to_string();
        let reader = SqliteChainReader {
            path: path.to_owned(),
            shown,
        };
        let check = reader.clone_for_thread();
        tokio::task::spawn_blocking(move || {
            let conn = check.connect()?;
            let has_table: bool = conn
                .query_row(
                    "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'audit_events')",
                    [],
                    |row| row.get(0),
                )
                .map_err(|e| check.error(e))?;
            match has_table {
                true => Ok(()),
                false => Err(ReadError::NoSchema(check.shown.clone())),
            }
        })
        .await
        .map_err(|e| ReadError::Read(e.to_string()))??;
        Ok(reader)
    }

    fn clone_for_thread(&self) -> Self {
        SqliteChainReader {
            path: self.path.clone(),
            shown: self.shown.clone(),
        }
    }

    fn connect(&self) -> Result<rusqlite::Connection, ReadError> {
        // Checked first: without CREATE SQLite would refuse anyway, but this
        // says why, and a missing folder is not created either.
        if !self.path.is_file() {
            return Err(ReadError::NoDatabase(self.shown.clone()));
        }
        let flags =
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let conn =
            rusqlite::Connection::open_with_flags(&self.path, flags).map_err(|e| self.error(e))?;
        conn.busy_timeout(BUSY_TIMEOUT).map_err(|e| self.error(e))?;
        Ok(conn)
    }

    fn error(&self, error: rusqlite::Error) -> ReadError {
        match &error {
            rusqlite::Error::SqliteFailure(failure, _)
                if failure.code == rusqlite::ErrorCode::CannotOpen =>
            {
                ReadError::NoDatabase(self.shown.clone())
            }
            _ => ReadError::Read(format!("{}: {error}", self.shown)),
        }
    }

    /// The blocking side of [`ChainSource::stream`].
    fn stream_blocking(
        &self,
        window: Option<(String, String)>,
        out: &tokio::sync::mpsc::Sender<Vec<RawRow>>,
    ) -> Result<(), ReadError> {
        let conn = self.connect()?;
        let sql = match window {
            None => format!(
                "SELECT {READ_COLUMNS} FROM audit_events WHERE id > ?1 ORDER BY id LIMIT ?2"
            ),
            Some(_) => format!(
                "SELECT {READ_COLUMNS} FROM audit_events WHERE id > ?1 AND ts >= ?3 AND ts < ?4 \
                 ORDER BY id LIMIT ?2"
            ),
        };
        let mut statement = conn.prepare(&sql).map_err(|e| self.error(e))?;
        let mut after_id = 0i64;
        loop {
            let mut rows = match &window {
                None => statement.query(rusqlite::params![after_id, READ_PAGE]),
                Some((from, to)) => {
                    statement.query(rusqlite::params![after_id, READ_PAGE, from, to])
                }
            }
            .map_err(|e| self.error(e))?;
            let mut batch = Vec::with_capacity(BATCH);
            let mut read = 0;
            while let Some(row) = rows.next().map_err(|e| self.error(e))? {
                let raw = raw_row(row).map_err(|e| self.error(e))?;
                after_id = raw.id;
                read += 1;
                batch.push(raw);
                if batch.len() == BATCH {
                    let full = std::mem::replace(&mut batch, Vec::with_capacity(BATCH));
                    if out.blocking_send(full).is_err() {
                        return Ok(());
                    }
                }
            }
            if !batch.is_empty() && out.blocking_send(batch).is_err() {
                return Ok(());
            }
            if read < READ_PAGE {
                return Ok(());
            }
        }
    }
}

fn raw_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<RawRow> {
    Ok(RawRow {
        id: row.get(0)?,
        request_id: row.get(1)?,
        event_id: row.get(2)?,
        ts: row.get(3)?,
        actor: row.get(4)?,
        action: row.get(5)?,
        decision: row.get(6)?,
        payload: row.get(7)?,
        prev_hash: row.get(8)?,
        hash: row.get(9)?,
    })
}

#[async_trait]
impl ChainSource for SqliteChainReader {
    async fn stream(
        &self,
        filter: &EventFilter,
        out: tokio::sync::mpsc::Sender<Vec<RawRow>>,
    ) -> Result<(), ReadError> {
        let reader = self.clone_for_thread();
        let window = filter.ts_window.clone();
        tokio::task::spawn_blocking(move || reader.stream_blocking(window, &out))
            .await
            .map_err(|e| ReadError::Read(e.to_string()))?
    }

    async fn hash_before(&self, id: i64) -> Result<Option<String>, ReadError> {
        let reader = self.clone_for_thread();
        tokio::task::spawn_blocking(move || {
            reader
                .connect()?
                .query_row(
                    "SELECT hash FROM audit_events WHERE id < ?1 ORDER BY id DESC LIMIT 1",
                    [id],
                    |row| row.get(0),
                )
                .optional()
                .map_err(|e| reader.error(e))
        })
        .await
        .map_err(|e| ReadError::Read(e.to_string()))?
    }

    async fn count(&self, filter: &EventFilter) -> Result<u64, ReadError> {
        let reader = self.clone_for_thread();
        let window = filter.ts_window.clone();
        tokio::task::spawn_blocking(move || {
            let conn = reader.connect()?;
            let count: i64 = match &window {
                None => conn.query_row("SELECT COUNT(*) FROM audit_events", [], |row| row.get(0)),
                Some((from, to)) => conn.query_row(
                    "SELECT COUNT(*) FROM audit_events WHERE ts >= ?1 AND ts < ?2",
                    [from, to],
                    |row| row.get(0),
                ),
            }
            .map_err(|e| reader.error(e))?;
            Ok(count.max(0) as u64)
        })
        .await
        .map_err(|e| ReadError::Read(e.to_string()))?
    }

    async fn head_since(&self, since: &Head) -> Result<Option<Head>, ReadError> {
        let reader = self.clone_for_thread();
        let since = since.clone();
        tokio::task::spawn_blocking(move || {
            let conn = reader.connect()?;
            // Rows never change once written, so the anchor read before the
            // head still holds when the head is read.
            let anchored = since.last_id == 0
                || conn
                    .query_row(
                        "SELECT hash FROM audit_events WHERE id = ?1",
                        [since.last_id],
                        |row| row.get::<_, String>(0),
                    )
                    .optional()
                    .map_err(|e| reader.error(e))?
                    .is_some_and(|hash| hash == since.last_hash);
            let head = match anchored {
                false => None,
                true => conn
                    .query_row(HEAD_SINCE_SQL, [since.last_id], |row| {
                        Ok(Head {
                            last_id: row.get(0)?,
                            last_hash: row.get(1)?,
                            count: since.count + row.get::<_, i64>(2)?.max(0) as u64,
                        })
                    })
                    .optional()
                    .map_err(|e| reader.error(e))?,
            };
            Ok(head)
        })
        .await
        .map_err(|e| ReadError::Read(e.to_string()))?
    }

    async fn head(&self) -> Result<Head, ReadError> {
        let reader = self.clone_for_thread();
        tokio::task::spawn_blocking(move || {
            reader
                .connect()?
                .query_row(HEAD_SQL, [], |row| {
                    Ok(Head {
                        last_id: row.get(0)?,
                        last_hash: row.get(1)?,
                        count: row.get::<_, i64>(2)?.max(0) as u64,
                    })
                })
                .optional()
                .map(|head| head.unwrap_or(Head::EMPTY))
                .map_err(|e| reader.error(e))
        })
        .await
        .map_err(|e| ReadError::Read(e.to_string()))?
    }
}

/// The head and the count up to it in one statement: one snapshot, whatever
/// a live writer appends meanwhile. (The same text serves PostgreSQL.)
pub(crate) const HEAD_SQL: &str = "SELECT id, hash, \
     (SELECT COUNT(*) FROM audit_events WHERE id <= head.id) \
     FROM audit_events AS head ORDER BY id DESC LIMIT 1";

/// [`HEAD_SQL`] counting only the rows after id `?1` (`$1` in PostgreSQL's
/// copy): a range scan of the primary key.
const HEAD_SINCE_SQL: &str = "SELECT id, hash, \
     (SELECT COUNT(*) FROM audit_events WHERE id > ?1 AND id <= head.id) \
     FROM audit_events AS head ORDER BY id DESC LIMIT 1";

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn events(tag: &str, count: usize) -> Vec<NewEvent> {
        (0..count)
            .map(|i| {
                NewEvent::now(
                    &format!("{tag}-{i}"),
                    "role:test".into(),
                    "cliniccloud.create_appointment",
                    "ALLOW",
                    json!({"tag": tag, "i": i}),
                )
            })
            .collect()
    }

    async fn stored(log: &SqliteAuditLog) -> Vec<StoredEvent> {
        log.page(&EventFilter::default(), 0, 1000).await.unwrap()
    }

    #[tokio::test]
    async fn receipts_name_the_rows_written_and_a_failed_batch_leaves_no_trace() {
        let dir = tempfile::tempdir().unwrap();
        let log = SqliteAuditLog::open(&dir.path().join("audit.db"))
            .await
            .unwrap();
        let mut receipts = log.append_batch(&events("a", 3)).await.unwrap();

        // A batch that fails inside its transaction is rolled back, and the
        // writer's connection carries on from the same head.
        log.read(|conn| conn.execute_batch("ALTER TABLE audit_events RENAME TO moved_away"))
            .await
            .unwrap();
        let failed = log.append_batch(&events("lost", 2)).await;
        assert!(matches!(failed, Err(AuditError::Rejected(_))), "{failed:?}");
        log.read(|conn| conn.execute_batch("ALTER TABLE moved_away RENAME TO audit_events"))
            .await
            .unwrap();
        receipts.extend(log.append_batch(&events("b", 2)).await.unwrap());

        let rows = stored(&log).await;
        assert_eq!(rows.len(), 5);
        assert!(
            rows.iter()
                .all(|row| !row.event.request_id.starts_with("lost"))
        );
        for (row, receipt) in rows.iter().zip(&receipts) {
            assert_eq!((row.id, &row.hash), (receipt.id, &receipt.hash));
        }
        assert_eq!(rows[0].prev_hash, "");
        for pair in rows.windows(2) {
            assert_eq!(pair[1].prev_hash, pair[0].hash);
            assert_eq!(
                pair[1].hash,
                chain::event_hash(&pair[1].event, &pair[0].hash)
            );
        }
    }
}
