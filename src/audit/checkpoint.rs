//! Signed checkpoints of the chain head, and the check that the chain still
//! holds them.
//!
//! A valid chain says that no row was changed in place; it cannot say that
//! none is missing at the end, or that the whole database was not rebuilt
//! with hashes recomputed. A checkpoint (last id, last hash, count, time),
//! signed with a key kept away from the database, can: `audit verify
//! --checkpoints` fails when a checkpointed hash is no longer at its id, or
//! when the chain stops before the last checkpoint.
//!
//! A checkpoint file is one signed JSON document a line (see
//! [`super::signing`] for the signature), appended by `audit checkpoint
//! --out` and by `serve` with `CASF_AUDIT_CHECKPOINT_EVERY`.

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::{Value, json};

use super::chain::{ChainVerifier, format_ts};
use super::scan::ChainSource;
use super::signing::{AuditPublicKey, AuditSigningKey};
use crate::canonical;
use crate::metrics::{CheckpointResult, Metrics};

/// The `type` of a checkpoint document.
pub const KIND: &str = "casf-audit-checkpoint";

/// The head of a chain, read in one statement (one snapshot).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    /// `0` for an empty chain.
    pub last_id: i64,
    /// `""` for an empty chain.
    pub last_hash: String,
    /// Events with `id <= last_id`.
    pub count: u64,
}

impl Head {
    pub const EMPTY: Head = Head {
        last_id: 0,
        last_hash: String::new(),
        count: 0,
    };
}

/// The unsigned checkpoint document of `head` at `at`.
pub fn document(head: &Head, backend: &str, at: DateTime<Utc>) -> Value {
    json!({
        "type": KIND,
        "version": 1,
        "backend": backend,
        "last_id": head.last_id,
        "last_hash": head.last_hash,
        "count": head.count,
        "time": format_ts(at),
    })
}

/// Reads the head of `source` and signs a checkpoint of it.
pub async fn make(
    source: &dyn ChainSource,
    backend: &str,
    key: &AuditSigningKey,
) -> Result<Value, super::scan::ReadError> {
    let head = source.head().await?;
    Ok(signed(&head, backend, key))
}

fn signed(head: &Head, backend: &str, key: &AuditSigningKey) -> Value {
    let mut doc = document(head, backend, Utc::now());
    key.sign_document(&mut doc);
    doc
}

/// The head for the next of `serve`'s checkpoints: counted from the last
/// one it wrote while that one is still in the chain, else afresh (the
/// first after start, or after the chain below it changed, which is logged:
/// `audit verify --checkpoints` will name what).
async fn next_head(
    source: &dyn ChainSource,
    last: Option<&Head>,
) -> Result<Head, super::scan::ReadError> {
    if let Some(last) = last {
        match source.head_since(last).await? {
            Some(head) => return Ok(head),
            None => tracing::warn!(
                last_id = last.last_id,
                "the chain no longer holds the last checkpoint's head: counting afresh"
            ),
        }
    }
    source.head().await
}

/// One line of canonical JSON, the form a checkpoint file holds.
pub fn line(doc: &Value) -> String {
    canonical::to_string(doc)
}

/// Appends `doc` as one line to `path` (created if missing) and syncs it.
pub fn append(path: &Path, doc: &Value) -> std::io::Result<()> {
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?;
    // One write of the whole line, so concurrent appenders do not interleave.
    file.write_all(format!("{}\n", line(doc)).as_bytes())?;
    file.sync_data()
}

/// A checkpoint as read back from a file.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    /// 1-based line number in the file.
    pub line: usize,
    pub doc: Value,
    pub head: Head,
    pub time: String,
}

impl std::fmt::Display for Checkpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "checkpoint at line {} (id {}, {} events, {})",
            self.line, self.head.last_id, self.head.count, self.time
        )
    }
}

/// Reads every checkpoint of a file. A file that cannot be read, holds no
/// checkpoint or a line that is not one is an error (nothing to check
/// against), not a failed check.
pub fn read_file(path: &Path) -> Result<Vec<Checkpoint>, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read the checkpoint file {}: {e}", path.display()))?;
    let mut checkpoints = Vec::new();
    for (index, raw) in text.lines().enumerate() {
        if raw.trim().is_empty() {
            continue;
        }
        let line = index + 1;
        let parsed = parse(raw).map_err(|reason| {
            format!("{} line {line}: not a checkpoint: {reason}", path.display())
        })?;
        checkpoints.push(Checkpoint {
            line,
            doc: parsed.0,
            head: parsed.1,
            time: parsed.2,
        });
    }
    if checkpoints.is_empty() {
        return Err(format!("{} holds no checkpoint", path.display()));
    }
    Ok(checkpoints)
}

fn parse(raw: &str) -> Result<(Value, Head, String), String> {
    let doc: Value = serde_json::from_str(raw).map_err(|e| e.to_string())?;
    if doc.get("type").and_then(Value::as_str) != Some(KIND) {
        return Err(format!("\"type\" is not {KIND:?}"));
    }
    if doc.get("version").and_then(Value::as_u64) != Some(1) {
        return Err("\"version\" is not 1".into());
    }
    let field = |name: &str| doc.get(name).ok_or_else(|| format!("no {name:?}"));
    let last_id = field("last_id")?
        .as_i64()
        .filter(|id| *id >= 0)
        .ok_or("\"last_id\" is not a whole number")?;
    let last_hash = field("last_hash")?
        .as_str()
        .ok_or("\"last_hash\" is not a string")?
        .to_owned();
    let count = field("count")?
        .as_u64()
        .ok_or("\"count\" is not a whole number")?;
    let time = field("time")?
        .as_str()
        .ok_or("\"time\" is not a string")?
        .to_owned();
    Ok((
        doc,
        Head {
            last_id,
            last_hash,
            count,
        },
        time,
    ))
}

/// The ids whose hash and position the chain walk must record.
pub fn watched_ids(checkpoints: &[Checkpoint]) -> BTreeSet<i64> {
    checkpoints
        .iter()
        .map(|c| c.head.last_id)
        .filter(|id| *id > 0)
        .collect()
}

/// A checkpoint the trail no longer holds, and why.
#[derive(Debug, Clone)]
pub struct Failure {
    pub checkpoint: Checkpoint,
    pub reason: String,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} fails: {}", self.checkpoint, self.reason)
    }
}

/// Checks every checkpoint against a chain walked with
/// [`ChainVerifier::watching`] their [`watched_ids`]: its signature, that
/// its hash is still the hash at its id with as many events up to it, and
/// so that the chain reaches it.
pub fn check(
    checkpoints: &[Checkpoint],
    key: &AuditPublicKey,
    chain: &ChainVerifier,
) -> Vec<Failure> {
    let fail = |checkpoint: &Checkpoint, reason: String| Failure {
        checkpoint: checkpoint.clone(),
        reason,
    };
    let last = chain.last_seen();
    let mut failures = Vec::new();
    for checkpoint in checkpoints {
        if let Err(error) = key.verify_document(&checkpoint.doc) {
            failures.push(fail(checkpoint, error.to_string()));
            continue;
        }
        let head = &checkpoint.head;
        if head.last_id == 0 {
            continue; // An empty chain: every chain extends it.
        }
        let Some((count, hash)) = chain.seen_at(head.last_id) else {
            let reason = match last {
                Some((last_id, _)) if last_id >= head.last_id => format!(
                    "the chain has no event with id {}: it was deleted",
                    head.last_id
                ),
                Some((last_id, count)) => format!(
                    "the chain ends at id {last_id} ({count} events), before it: its tail was cut off"
                ),
                None => "the chain is empty: it was truncated or replaced".to_owned(),
            };
            failures.push(fail(checkpoint, reason));
            continue;
        };
        if hash != head.last_hash {
            failures.push(fail(
                checkpoint,
                format!(
                    "event id {} has hash {hash}, the checkpoint signed {}: the chain up to it was rewritten or replaced",
                    head.last_id, head.last_hash
                ),
            ));
        } else if count != head.count {
            failures.push(fail(
                checkpoint,
                format!(
                    "the chain holds {count} events up to id {}, the checkpoint signed {}",
                    head.last_id, head.count
                ),
            ));
        }
    }
    failures
}

/// `serve`'s periodic checkpoints (`CASF_AUDIT_CHECKPOINT_EVERY`).
pub struct Schedule {
    pub every: Duration,
    pub file: PathBuf,
    pub key: Arc<AuditSigningKey>,
    pub source: Box<dyn ChainSource>,
    pub backend: &'static str,
}

impl Schedule {
    /// Writes a checkpoint every `every` until `stopped` resolves. A failed
    /// one is logged, counted and retried at the next tick: the server keeps
    /// serving.
    pub async fn run(self, metrics: Arc<Metrics>, stopped: impl Future<Output = ()>) {
        let mut ticks = tokio::time::interval(self.every);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticks.tick().await; // The first tick is immediate; the first checkpoint is one period in.
        tokio::pin!(stopped);
        // The head of the last checkpoint written, to count from.
        let mut last: Option<Head> = None;
        loop {
            tokio::select! {
                () = &mut stopped => return,
                _ = ticks.tick() => {
                    let result = match self.write_one(&mut last).await {
                        Ok(()) => CheckpointResult::Written,
                        Err(()) => CheckpointResult::Failed,
                    };
                    metrics.checkpoint(result, Utc::now().timestamp());
                }
            }
        }
    }

    /// Writes one checkpoint, counted from `last`, and makes it the new
    /// `last`; `Err` once the failure is logged.
    async fn write_one(&self, last: &mut Option<Head>) -> Result<(), ()> {
        let started = std::time::Instant::now();
        let head = match next_head(self.source.as_ref(), last.as_ref()).await {
            Ok(head) => head,
            Err(error) => {
                tracing::warn!(%error, "audit checkpoint not written: cannot read the chain head");
                return Err(());
            }
        };
        let doc = signed(&head, self.backend, &self.key);
        let file = self.file.clone();
        let written = tokio::task::spawn_blocking({
            let doc = doc.clone();
            move || append(&file, &doc)
        })
        .await;
        match written {
            Ok(Ok(())) => {
                *last = Some(head);
                tracing::info!(
                    last_id = doc["last_id"].as_i64(),
                    count = doc["count"].as_u64(),
                    took_ms = started.elapsed().as_millis() as u64,
                    file = %self.file.display(),
                    "audit checkpoint written"
                );
                Ok(())
            }
            Ok(Err(error)) => {
                tracing::warn!(
                    %error,
                    file = %self.file.display(),
                    "audit checkpoint not written"
                );
                Err(())
            }
            Err(error) => {
                tracing::warn!(%error, "audit checkpoint not written");
                Err(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::chain::{link, stored};
    use crate::audit::{NewEvent, StoredEvent};

    fn chain(n: u32) -> Vec<StoredEvent> {
        let events: Vec<NewEvent> = (1..=n)
            .map(|i| NewEvent {
                request_id: format!("r{i}"),
                event_id: format!("e{i}"),
                ts: "2026-02-09T10:00:00.000000Z".into(),
                actor: "role:nurse".into(),
                action: "twilio.send_sms".into(),
                decision: "ALLOW".into(),
                payload: json!({"i": i}),
            })
            .collect();
        stored("", events)
    }

    fn walk(rows: &[StoredEvent], watch: BTreeSet<i64>) -> ChainVerifier {
        let mut v = ChainVerifier::new(Some(String::new())).watching(watch);
        rows.iter().for_each(|e| v.push(e));
        v
    }

    fn checkpoint_of(rows: &[StoredEvent], key: &AuditSigningKey, line: usize) -> Checkpoint {
        let last = rows.last().unwrap();
        let head = Head {
            last_id: last.id,
            last_hash: last.hash.clone(),
            count: rows.len() as u64,
        };
        let mut doc = document(&head, "sqlite", Utc::now());
        key.sign_document(&mut doc);
        let (doc, head, time) = parse(&super::line(&doc)).unwrap();
        Checkpoint {
            line,
            doc,
            head,
            time,
        }
    }

    #[test]
    fn checkpoints_hold_on_the_chain_they_were_taken_of_and_its_extensions() {
        let key = AuditSigningKey::generate().unwrap();
        let rows = chain(10);
        let cps = vec![
            checkpoint_of(&rows[..4], &key, 1),
            checkpoint_of(&rows[..7], &key, 2),
        ];
        let v = walk(&rows, watched_ids(&cps));
        assert!(check(&cps, &key.public_key(), &v).is_empty());
    }

    #[test]
    fn a_cut_tail_a_rewritten_prefix_and_a_forged_signature_each_fail() {
        let key = AuditSigningKey::generate().unwrap();
        let rows = chain(10);
        let cps = vec![checkpoint_of(&rows[..8], &key, 1)];

        let cut = walk(&rows[..5], watched_ids(&cps));
        assert!(cut.is_valid(), "a cut tail is still a valid chain");
        let failures = check(&cps, &key.public_key(), &cut);
        assert!(
            failures[0].reason.contains("tail was cut off"),
            "{failures:?}"
        );

        // A different chain, consistently hashed, of the same length.
        let mut rewritten = chain(10);
        rewritten[0].event.payload = json!({"i": 100});
        let events: Vec<NewEvent> = rewritten.iter().map(|e| e.event.clone()).collect();
        for (row, l) in rewritten.iter_mut().zip(link("", &events)) {
            row.prev_hash = l.prev_hash;
            row.hash = l.hash;
        }
        let v = walk(&rewritten, watched_ids(&cps));
        assert!(v.is_valid());
        let failures = check(&cps, &key.public_key(), &v);
        assert!(
            failures[0].reason.contains("rewritten or replaced"),
            "{failures:?}"
        );

        let mut forged = cps.clone();
        forged[0].doc["count"] = json!(3);
        let v = walk(&rows, watched_ids(&forged));
        let failures = check(&forged, &key.public_key(), &v);
        assert!(
            failures[0].reason.contains("does not verify"),
            "{failures:?}"
        );
        assert!(
            failures[0]
                .to_string()
                .starts_with("checkpoint at line 1 (id 8")
        );
    }

    #[test]
    fn bad_lines_are_refused_with_their_line_number() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cp.jsonl");
        std::fs::write(&path, "\n").unwrap();
        assert!(
            read_file(&path)
                .unwrap_err()
                .contains("holds no checkpoint")
        );
        std::fs::write(
            &path,
            "{\"type\":\"casf-audit-checkpoint\",\"version\":1}\n",
        )
        .unwrap();
        assert!(read_file(&path).unwrap_err().contains("line 1"));
    }
}
