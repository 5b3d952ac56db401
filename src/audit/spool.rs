//! The local audit spool (`CASF_AUDIT_SPOOL`): where a decision's event goes
//! when PostgreSQL cannot take it, so that an outage costs the chain time,
//! not rows.
//!
//! One append-only file, `audit-spool.jsonl`, of one record a line:
//! `<checksum> <event JSON>\n`, where the checksum is the first 16 hex digits
//! of the SHA-256 of the JSON. A batch is written with one `write` and made
//! durable with `fdatasync` before any of its callers is answered. A plain
//! file rather than SQLite: the writer only ever appends, reads in order and
//! empties it, and a torn tail is the only damage a crash can leave, which
//! the checksum and the final newline detect; [`Spool::open`] cuts it off.
//!
//! With `CASF_AUDIT_SPOOL_MODE=always` ([`SpoolMode::Always`]) every event
//! goes through the spool: it is the commit point of each decision, and a
//! shipper ships it to PostgreSQL behind the answer.
//!
//! The spool sits behind one mutex, held for file operations only (never
//! across a PostgreSQL round trip): the audit writer appends, and the drain
//! (on the writer's thread, or the shipper's in `always` mode) reads.
//! Draining reads from a remembered offset; the file is truncated once every
//! record has reached the chain, and compacted (the undrained tail copied to
//! a new file renamed over it) once the drained head passes
//! [`COMPACT_BYTES`], so a spool that never quite empties under steady load
//! does not grow. Records drained before a crash are drained again on
//! restart and skipped by `event_id`.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

use super::NewEvent;

/// The spool file inside `CASF_AUDIT_SPOOL`.
pub const FILE_NAME: &str = "audit-spool.jsonl";
/// Extension of the file a compaction writes before renaming it.
const COMPACTING: &str = "jsonl.compacting";
/// `CASF_AUDIT_SPOOL_MAX_BYTES` default: 256 MiB, about 100,000 decisions.
pub const DEFAULT_MAX_BYTES: u64 = 256 * 1024 * 1024;
/// Drained bytes at the head of the file before it is compacted (or half
/// of `max_bytes`, if that is less): about 1,500 decisions, a rewrite of
/// the small undrained tail every second or two at 1,000 decisions a second.
pub const COMPACT_BYTES: u64 = 1024 * 1024;

/// `CASF_AUDIT_SPOOL_MODE`: when an event goes through the spool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SpoolMode {
    /// Only when PostgreSQL cannot take it (the default).
    #[default]
    Outage,
    /// Always: the synced spool is the commit point of every decision, and
    /// events are shipped to PostgreSQL in the background, in order.
    Always,
}

impl SpoolMode {
    pub const ALL: [SpoolMode; 2] = [SpoolMode::Outage, SpoolMode::Always];

    pub fn as_str(self) -> &'static str {
        match self {
            SpoolMode::Outage => "outage",
            SpoolMode::Always => "always",
        }
    }

    pub fn parse(raw: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|mode| mode.as_str().eq_ignore_ascii_case(raw.trim()))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("audit spool is full ({len} + {more} bytes > {max})")]
    Full { len: u64, more: u64, max: u64 },
    #[error("audit spool {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("audit spool {path}: record at byte {offset} is corrupt and not the last one")]
    Corrupt { path: String, offset: u64 },
}

/// One event as spooled: every field the hash covers, as it will be hashed.
#[derive(Serialize, Deserialize)]
struct Record {
    request_id: String,
    event_id: String,
    ts: String,
    actor: String,
    action: String,
    decision: String,
    payload: Value,
}

impl From<&NewEvent> for Record {
    fn from(e: &NewEvent) -> Self {
        Record {
            request_id: e.request_id.clone(),
            event_id: e.event_id.clone(),
            ts: e.ts.clone(),
            actor: e.actor.clone(),
            action: e.action.clone(),
            decision: e.decision.clone(),
            payload: e.payload.clone(),
        }
    }
}

impl From<Record> for NewEvent {
    fn from(r: Record) -> Self {
        NewEvent {
            request_id: r.request_id,
            event_id: r.event_id,
            ts: r.ts,
            actor: r.actor,
            action: r.action,
            decision: r.decision,
            payload: r.payload,
        }
    }
}

fn checksum(json: &[u8]) -> String {
    let digest = Sha256::digest(json);
    digest[..8].iter().map(|b| format!("{b:02x}")).collect()
}

/// The event in one line, or `None` if the line is torn or damaged.
fn parse_line(line: &[u8]) -> Option<NewEvent> {
    let line = line.strip_suffix(b"\n")?;
    let (sum, json) = (line.get(..16)?, line.get(17..)?);
    if line.get(16) != Some(&b' ') || sum != checksum(json).as_bytes() {
        return None;
    }
    serde_json::from_slice::<Record>(json)
        .ok()
        .map(NewEvent::from)
}

/// Events waiting in the spool in `dir`, read without changing it (for the
/// `audit` commands, which may run beside a live verifier). A torn last
/// record is not counted.
pub fn waiting(dir: &Path) -> std::io::Result<u64> {
    let file = match File::open(dir.join(FILE_NAME)) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
    };
    let mut reader = BufReader::new(file);
    let (mut count, mut line) = (0, Vec::new());
    loop {
        line.clear();
        if reader.read_until(b'\n', &mut line)? == 0 {
            return Ok(count);
        }
        if parse_line(&line).is_some() {
            count += 1;
        }
    }
}

pub struct Spool {
    path: PathBuf,
    file: File,
    /// Bytes in the file.
    len: u64,
    /// Where the first record not yet in the chain starts.
    drained_to: u64,
    /// Records from `drained_to` to the end.
    depth: u64,
    /// How many records at the head (from `drained_to`) may already be in
    /// the chain: all of them at open (a drain may have committed them
    /// before a crash recorded it), and those of a drain whose commit
    /// failed or whose outcome is unknown. Records spooled behind them
    /// without an append attempt (`always` mode) cannot be, so the drain
    /// need not look them up.
    may_be_in_chain: u64,
    max_bytes: u64,
    /// A compaction renamed the file but could not reopen it: appends are
    /// refused rather than written to the unlinked old file.
    broken: bool,
}

impl Spool {
    /// Opens (creating) the spool in `dir`, cutting off a torn last record.
    /// A damaged record followed by good ones is not a crash's doing, and
    /// is refused rather than skipped.
    pub fn open(dir: &Path, max_bytes: u64) -> Result<Self, SpoolError> {
        let path = dir.join(FILE_NAME);
        let io = |source| SpoolError::Io {
            path: path.display().to_string(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(io)?;
        // A compaction that crashed before its rename left the spool whole.
        let _ = std::fs::remove_file(path.with_extension(COMPACTING));
        let file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(&path)
            .map_err(io)?;
        let mut reader = BufReader::new(&file);
        let (mut good, mut depth, mut bad) = (0u64, 0u64, None);
        let mut line = Vec::new();
        loop {
            line.clear();
            let n = reader.read_until(b'\n', &mut line).map_err(io)? as u64;
            if n == 0 {
                break;
            }
            match (bad, parse_line(&line)) {
                (None, Some(_)) => {
                    good += n;
                    depth += 1;
                }
                (None, None) => bad = Some(good),
                (Some(offset), Some(_)) => {
                    return Err(SpoolError::Corrupt {
                        path: path.display().to_string(),
                        offset,
                    });
                }
                (Some(_), None) => {}
            }
        }
        drop(reader);
        if bad.is_some() {
            tracing::warn!(path = %path.display(), at = good, "audit spool: cutting off a torn last record (left by a crash before it was acknowledged)");
            file.set_len(good).map_err(io)?;
            file.sync_all().map_err(io)?;
        }
        Ok(Spool {
            path,
            file,
            len: good,
            drained_to: 0,
            depth,
            may_be_in_chain: depth,
            max_bytes,
            broken: false,
        })
    }

    /// Records not yet in the chain.
    pub fn depth(&self) -> u64 {
        self.depth
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Records at the head that may already be in the chain (see the field).
    pub fn may_be_in_chain(&self) -> u64 {
        self.may_be_in_chain
    }

    /// The `count` records at the head went to an append that failed or
    /// whose outcome is unknown: the next drain looks them up first.
    pub fn suspect_head(&mut self, count: usize) {
        self.may_be_in_chain = self.may_be_in_chain.max(count as u64).min(self.depth);
    }

    fn io(&self, source: std::io::Error) -> SpoolError {
        SpoolError::Io {
            path: self.path.display().to_string(),
            source,
        }
    }

    /// Appends `events` in order and syncs them to disk; all or nothing.
    pub fn append(&mut self, events: &[NewEvent]) -> Result<(), SpoolError> {
        let mut buf = Vec::new();
        for event in events {
            let json = serde_json::to_vec(&Record::from(event))
                .map_err(|e| self.io(std::io::Error::other(e)))?;
            buf.extend_from_slice(checksum(&json).as_bytes());
            buf.push(b' ');
            buf.extend_from_slice(&json);
            buf.push(b'\n');
        }
        let more = buf.len() as u64;
        if self.broken {
            return Err(self.io(std::io::Error::other(
                "spool file lost after a failed compaction; restart to reopen it",
            )));
        }
        if self.len + more > self.max_bytes {
            return Err(SpoolError::Full {
                len: self.len,
                more,
                max: self.max_bytes,
            });
        }
        let written = self
            .file
            .write_all(&buf)
            .and_then(|()| self.file.sync_data());
        if let Err(error) = written {
            // A partial write must not stay as a torn record in the middle.
            let _ = self.file.set_len(self.len);
            return Err(self.io(error));
        }
        self.len += more;
        self.depth += events.len() as u64;
        Ok(())
    }

    /// Up to `limit` of the oldest records not yet drained, and the offset
    /// just past the last of them (for [`Spool::drained`]).
    pub fn peek(&mut self, limit: usize) -> Result<(Vec<NewEvent>, u64), SpoolError> {
        let mut file = &self.file;
        file.seek(SeekFrom::Start(self.drained_to))
            .map_err(|e| self.io(e))?;
        let mut reader = BufReader::new(file.take(self.len - self.drained_to));
        let (mut events, mut end, mut line) = (Vec::new(), self.drained_to, Vec::new());
        while events.len() < limit {
            line.clear();
            let n = reader
                .read_until(b'\n', &mut line)
                .map_err(|e| self.io(e))?;
            if n == 0 {
                break;
            }
            let Some(event) = parse_line(&line) else {
                return Err(SpoolError::Corrupt {
                    path: self.path.display().to_string(),
                    offset: end,
                });
            };
            end += n as u64;
            events.push(event);
        }
        Ok((events, end))
    }

    /// Marks the `count` records before `end` as in the chain; once all
    /// are, the file is emptied, and once enough are, compacted.
    pub fn drained(&mut self, end: u64, count: usize) -> Result<(), SpoolError> {
        self.drained_to = end;
        self.depth = self.depth.saturating_sub(count as u64);
        self.may_be_in_chain = self.may_be_in_chain.saturating_sub(count as u64);
        if self.drained_to >= self.len {
            // Not synced: a crash that undoes the truncation leaves records
            // that are in the chain, which the next start drains again and
            // skips by `event_id`; the next append's sync commits it anyway.
            self.file.set_len(0).map_err(|e| self.io(e))?;
            self.len = 0;
            self.drained_to = 0;
            self.depth = 0;
            self.may_be_in_chain = 0;
        } else if self.drained_to >= COMPACT_BYTES.min(self.max_bytes / 2) {
            self.compact()?;
        }
        Ok(())
    }

    /// Rewrites the file as its undrained tail. The new file is synced
    /// before it is renamed over the old one, and the directory after: a
    /// crash leaves either file whole, and the old one only repeats records
    /// that the drain skips by `event_id`.
    fn compact(&mut self) -> Result<(), SpoolError> {
        let mut tail = Vec::with_capacity((self.len - self.drained_to) as usize);
        let mut file = &self.file;
        file.seek(SeekFrom::Start(self.drained_to))
            .and_then(|_| file.take(self.len - self.drained_to).read_to_end(&mut tail))
            .map_err(|e| self.io(e))?;
        let fresh_path = self.path.with_extension(COMPACTING);
        let renamed = File::create(&fresh_path)
            .and_then(|mut fresh| {
                fresh.write_all(&tail)?;
                fresh.sync_all()
            })
            .and_then(|()| std::fs::rename(&fresh_path, &self.path));
        if let Err(error) = renamed {
            // The old file is still the spool, whole.
            let _ = std::fs::remove_file(&fresh_path);
            return Err(self.io(error));
        }
        if let Some(dir) = self.path.parent()
            && let Err(error) = File::open(dir).and_then(|dir| dir.sync_all())
        {
            tracing::warn!(%error, "audit spool: directory not synced after compaction");
        }
        match OpenOptions::new().read(true).append(true).open(&self.path) {
            Ok(fresh) => {
                self.file = fresh;
                self.len = tail.len() as u64;
                self.drained_to = 0;
                Ok(())
            }
            Err(error) => {
                // Appends to the old, unlinked file would be lost.
                self.broken = true;
                Err(self.io(error))
            }
        }
    }

    /// When the oldest event not yet in the chain was decided (its `ts`).
    pub fn oldest_ts(&mut self) -> Result<Option<String>, SpoolError> {
        Ok(self.peek(1)?.0.pop().map(|event| event.ts))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(request_id: &str) -> NewEvent {
        NewEvent::now(
            request_id,
            "role:nurse".into(),
            "t",
            "ALLOW",
            serde_json::json!({"n": 1.5, "s": "é\"\\", "big": 12345678901234567890u64}),
        )
    }

    #[test]
    fn events_come_back_as_written_in_order_and_the_file_empties_when_drained() {
        let dir = tempfile::tempdir().unwrap();
        let mut spool = Spool::open(dir.path(), DEFAULT_MAX_BYTES).unwrap();
        let written = [event("a"), event("b"), event("c")];
        spool.append(&written[..2]).unwrap();
        spool.append(&written[2..]).unwrap();
        assert_eq!(spool.depth(), 3);

        let mut spool = Spool::open(dir.path(), DEFAULT_MAX_BYTES).unwrap();
        assert_eq!(spool.depth(), 3);
        let (first, end) = spool.peek(2).unwrap();
        assert_eq!(first, written[..2]);
        spool.drained(end, 2).unwrap();
        assert_eq!(spool.depth(), 1);
        let (rest, end) = spool.peek(10).unwrap();
        assert_eq!(rest, written[2..]);
        spool.drained(end, 1).unwrap();
        assert_eq!(spool.depth(), 0);
        assert_eq!(std::fs::metadata(spool.path()).unwrap().len(), 0);
    }

    #[test]
    fn what_may_be_in_the_chain_is_the_head_left_at_open_or_marked_after_a_failed_drain() {
        let dir = tempfile::tempdir().unwrap();
        let written: Vec<NewEvent> = ["a", "b", "c"].map(event).into();
        Spool::open(dir.path(), 1 << 20)
            .unwrap()
            .append(&written)
            .unwrap();
        let mut spool = Spool::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(spool.may_be_in_chain(), 3, "all left by an earlier run");
        let (_, end) = spool.peek(2).unwrap();
        spool.drained(end, 2).unwrap();
        assert_eq!(spool.may_be_in_chain(), 1);
        spool.append(&[event("d"), event("e")]).unwrap();
        assert_eq!(spool.may_be_in_chain(), 1, "appended here, never tried");
        spool.suspect_head(2);
        assert_eq!(spool.may_be_in_chain(), 2);
        spool.suspect_head(9);
        assert_eq!(spool.may_be_in_chain(), 3, "at most the depth");
        let (_, end) = spool.peek(10).unwrap();
        spool.drained(end, 3).unwrap();
        assert_eq!((spool.depth(), spool.may_be_in_chain()), (0, 0));
    }

    #[test]
    fn a_torn_last_record_is_cut_off_and_appends_go_on_after_it() {
        let dir = tempfile::tempdir().unwrap();
        let mut spool = Spool::open(dir.path(), DEFAULT_MAX_BYTES).unwrap();
        spool.append(&[event("a"), event("b")]).unwrap();
        let path = spool.path().to_owned();
        let full = std::fs::metadata(&path).unwrap().len();
        drop(spool);
        // A crash mid-write: the last record lost its tail (and newline).
        let file = OpenOptions::new().write(true).open(&path).unwrap();
        file.set_len(full - 7).unwrap();
        drop(file);

        assert_eq!(waiting(dir.path()).unwrap(), 1);
        let mut spool = Spool::open(dir.path(), DEFAULT_MAX_BYTES).unwrap();
        assert_eq!(spool.depth(), 1);
        spool.append(&[event("c")]).unwrap();
        assert_eq!(waiting(dir.path()).unwrap(), 2);
        let (events, _) = spool.peek(10).unwrap();
        let ids: Vec<_> = events.iter().map(|e| e.request_id.as_str()).collect();
        assert_eq!(ids, ["a", "c"]);
    }

    #[test]
    fn a_last_record_with_a_bad_checksum_is_cut_off() {
        let dir = tempfile::tempdir().unwrap();
        let mut spool = Spool::open(dir.path(), DEFAULT_MAX_BYTES).unwrap();
        spool.append(&[event("a")]).unwrap();
        let path = spool.path().to_owned();
        drop(spool);
        // Garbage that happens to end in a newline (a torn page).
        let mut file = OpenOptions::new().append(true).open(&path).unwrap();
        file.write_all(b"0123456789abcdef {\"request_id\":\"x\"}\n")
            .unwrap();
        drop(file);
        let spool = Spool::open(dir.path(), DEFAULT_MAX_BYTES).unwrap();
        assert_eq!(spool.depth(), 1);
    }

    #[test]
    fn damage_before_good_records_is_refused_not_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE_NAME);
        let mut spool = Spool::open(dir.path(), DEFAULT_MAX_BYTES).unwrap();
        spool.append(&[event("a"), event("b")]).unwrap();
        drop(spool);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[20] ^= 1;
        std::fs::write(&path, bytes).unwrap();
        assert!(matches!(
            Spool::open(dir.path(), DEFAULT_MAX_BYTES),
            Err(SpoolError::Corrupt { offset: 0, .. })
        ));
    }

    #[test]
    fn a_drained_head_is_compacted_away_and_the_rest_still_drains_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let written: Vec<NewEvent> = (0..8).map(|i| event(&format!("e{i}"))).collect();
        let scratch = tempfile::tempdir().unwrap();
        let mut sized = Spool::open(scratch.path(), DEFAULT_MAX_BYTES).unwrap();
        sized.append(&written).unwrap();
        // Room for the eight and a bit: draining six passes half of it.
        let max = sized.len + sized.len / 4;
        let mut spool = Spool::open(dir.path(), max).unwrap();
        spool.append(&written).unwrap();
        let full = spool.len;
        let (head, end) = spool.peek(6).unwrap();
        assert_eq!(head, written[..6]);
        assert!(end >= max / 2, "the test needs the head past max/2: {end}");
        spool.drained(end, 6).unwrap();
        // Compacted: only the two undrained records are left in the file.
        assert_eq!(std::fs::metadata(spool.path()).unwrap().len(), full - end);
        assert_eq!(waiting(dir.path()).unwrap(), 2);
        spool.append(&[event("e8")]).unwrap();
        let (rest, _) = spool.peek(10).unwrap();
        let ids: Vec<_> = rest.iter().map(|e| e.request_id.as_str()).collect();
        assert_eq!(ids, ["e6", "e7", "e8"]);
        assert_eq!(spool.depth(), 3);
        assert!(!dir.path().join("audit-spool.jsonl.compacting").exists());
        // And what is on disk reopens as the same three.
        let mut reopened = Spool::open(dir.path(), max).unwrap();
        assert_eq!(reopened.peek(10).unwrap().0, rest);
    }

    #[test]
    fn a_full_spool_refuses_the_whole_batch() {
        let dir = tempfile::tempdir().unwrap();
        let mut spool = Spool::open(dir.path(), 400).unwrap();
        spool.append(&[event("a")]).unwrap();
        assert!(matches!(
            spool.append(&[event("b"), event("c")]),
            Err(SpoolError::Full { .. })
        ));
        assert_eq!(spool.depth(), 1);
    }
}
