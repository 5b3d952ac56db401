//! `RELIABILITY.md`, rendered from one run's records: the figures are what
//! this run measured, never typed in by hand.

use std::collections::BTreeMap;
use std::fmt::Write;

use crate::load::{Answer, Kind, Record};
use crate::oracle::Findings;
use crate::{Outage, Target};

/// The spool counters of one verifier process, or several summed.
#[derive(Clone, Debug, Default)]
pub struct SpoolCounters {
    pub spooled: f64,
    pub depth: f64,
    pub lost: f64,
    /// Processes counted.
    pub processes: usize,
}

fn series(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

impl SpoolCounters {
    /// The live process's counters, if it answers.
    pub async fn scrape(client: &reqwest::Client, base: &str) -> Option<SpoolCounters> {
        let text = client
            .get(format!("{base}/metrics"))
            .send()
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        Some(SpoolCounters {
            spooled: series(&text, "casf_audit_spooled_total")?,
            depth: series(&text, "casf_audit_spool_depth")?,
            lost: series(&text, "casf_audit_lost_total")?,
            processes: 1,
        })
    }

    pub fn add(&mut self, other: &SpoolCounters) {
        self.spooled += other.spooled;
        self.depth = other.depth;
        self.lost += other.lost;
        self.processes += other.processes;
    }
}

pub struct Figures<'a> {
    pub records: &'a [Record],
    pub outages: &'a [Outage],
    pub findings: &'a Findings,
    pub spool: &'a SpoolCounters,
    /// Events the verifier killed during the PostgreSQL outage left spooled.
    pub left_spooled: usize,
    pub chain_rows: usize,
    pub verify_exit: Option<i32>,
    pub verify_output: String,
    pub rate: u32,
    pub load_secs: f64,
    pub drain_secs: f64,
    pub total_secs: f64,
    pub nproc: usize,
    pub date: String,
    pub commit: String,
}

/// What counts as the service being back, seen from the answers.
fn good(outage: &Outage, r: &Record) -> bool {
    match outage.target {
        Target::Redis | Target::Opa => {
            matches!(r.kind, Kind::Write | Kind::SmsFirst)
                && r.decision() == Some("ALLOW")
                && !r.failed_closed()
        }
        Target::Postgres => r.decision().is_some() && !r.audit_failed(),
        Target::Verifier => r.decision().is_some(),
    }
}

fn during(o: &Outage, r: &Record) -> bool {
    r.sent_at >= o.down_at && r.sent_at < o.up_at
}

const INTRO: &str = "\
# Reliability: the chaos test

This file is rendered by the chaos test (`tests/chaos/`), not written by hand.
The test starts its own PostgreSQL cluster, Redis server (append-only file,
`appendfsync always`) and OPA-compatible server on ephemeral loopback ports,
and the `casf-verifier` binary on them with `PG_DSN`, `REDIS_URL`, `OPA_URL`
and `CASF_AUDIT_SPOOL` set. It offers a fixed-rate mixed load over
`POST /verify` (reads, writes the policy allows, writes the invariants or the
policy deny, SMS to new and already-messaged patients, and byte-for-byte
replays of answered requests), records every answer, and meanwhile kills
Redis (SIGKILL), stops PostgreSQL immediately (`pg_ctl stop -m immediate`),
kills the OPA server, kills the verifier (SIGKILL) and restarts each on the
same port; the verifier restarts on the same spool directory, once while
PostgreSQL is still down. Once the load stops it waits for the spool to drain
and reads the whole chain back from PostgreSQL.

It asserts invariants only; every count and time below is a figure of this
run, not a threshold:

- no wrong ALLOW: none for a request the invariants or the policy deny
  (KILL_SWITCH, a write in READ_ONLY or KILL_SWITCH, a write without
  `tenant_id`), in the answers or in the chain; no write ALLOW for a request
  sent after Redis or OPA was killed and answered before its restart began
  (except, for OPA, the replay of an ALLOW already stored); at most one SMS
  ALLOW per patient;
- no answered decision missing from the chain: each HTTP 200 answer has a
  row with its request_id, decision and violations, including those answered
  with the `| audit_append_failed` suffix during the PostgreSQL outages
  (spooled, then drained) and the replays (`REPLAY_DETECTED` rows). No
  exception is needed: the guide's `audit_append_failed` case is drained from
  the spool;
- no write decided twice: at most one row per request_id of a write tool
  that is neither `REPLAY_DETECTED` nor fail-closed (a fail-closed deny is
  not stored, so a retry after recovery is decided afresh, as the README
  promises). Reads are exempt by the guide (§6): when Redis fails for a read
  (down, or over its 200 ms budget) the read skips the anti-replay gate, so
  a replayed read may be decided, and audited, again. Both are counted
  below. Writes get no exception: a write whose first request was in
  flight while Redis was killed (claimed before, its decision then not
  stored) used to be decided afresh when replayed after
  `CASF_REPLAY_PENDING_TTL_SECONDS`; the Redis store now retries the store
  in the background, and the test asserts there are none;
- what the killed verifier left in its spool is in the chain exactly once;
- the chain links from genesis and every hash recomputes (independently, in
  the test), `casf-verifier audit verify` exits 0 on it, and
  `casf_audit_lost_total` stays 0.

Re-run it with the test services' binaries available (as `./scripts/test.sh`
provides them):

```sh
eval \"$(scripts/services.sh env)\" && export CASF_TEST_PG_BIN CASF_TEST_REDIS_SERVER CASF_TEST_PYTHON
cargo test --test chaos -- --nocapture                            # writes target/chaos/RELIABILITY.md
CASF_WRITE_RELIABILITY=1 cargo test --test chaos -- --nocapture   # and this file
```

`./scripts/test.sh` runs it with the rest of the suite (about a minute).
";

impl Figures<'_> {
    pub fn render(&self) -> String {
        let mut out = String::from(INTRO);
        let r = self.records;
        let decided = |d: &str| r.iter().filter(|x| x.decision() == Some(d)).count();
        let in_verifier_outage = |x: &Record| {
            self.outages
                .iter()
                .any(|o| o.target == Target::Verifier && during(o, x))
        };
        let cut_by_kill = |x: &Record| {
            self.outages.iter().any(|o| {
                o.target == Target::Verifier && x.sent_at < o.down_at && x.answered_at >= o.kill_at
            })
        };
        let failed: Vec<&Record> = r
            .iter()
            .filter(|x| matches!(x.answer, Answer::Failed { .. }))
            .collect();
        let failed_down = failed.iter().filter(|x| in_verifier_outage(x)).count();
        let failed_cut = failed
            .iter()
            .filter(|x| !in_verifier_outage(x) && cut_by_kill(x))
            .count();
        let failed_other = failed.len() - failed_down - failed_cut;
        let mut statuses: BTreeMap<u16, usize> = BTreeMap::new();
        for x in r {
            if let Answer::Status { status, .. } = x.answer {
                *statuses.entry(status).or_default() += 1;
            }
        }
        let statuses = if statuses.is_empty() {
            "none".to_owned()
        } else {
            statuses
                .iter()
                .map(|(s, n)| format!("{n} × {s}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let f = self.findings;
        let _ = write!(
            out,
            "
## Run

| | |
|---|---|
| date | {date} |
| commit | `{commit}` |
| nproc | {nproc} |
| offered rate | {rate} req/s |
| load duration | {load:.1} s |
| requests sent | {sent} ({achieved:.0} req/s achieved) |
| spool drained after the load in | {drain:.2} s |
| whole test (services started to report) | {total:.1} s |

## Answers

| | |
|---|---|
| ALLOW | {allow} |
| DENY | {deny} |
| NEEDS_APPROVAL | {approval} |
| of which fail-closed (`FAIL_CLOSED`) | {fc} |
| of which with `\\| audit_append_failed` | {af} |
| other HTTP statuses | {statuses} |
| no answer: connection errors while the verifier was down | {failed_down} |
| no answer: in flight when the verifier was killed | {failed_cut} |
| no answer: other (timeouts, resets) | {failed_other} |
",
            date = self.date,
            commit = self.commit,
            nproc = self.nproc,
            rate = self.rate,
            load = self.load_secs,
            sent = r.len(),
            achieved = r.len() as f64 / self.load_secs,
            drain = self.drain_secs,
            total = self.total_secs,
            allow = decided("ALLOW"),
            deny = decided("DENY"),
            approval = decided("NEEDS_APPROVAL"),
            fc = r.iter().filter(|x| x.failed_closed()).count(),
            af = r.iter().filter(|x| x.audit_failed()).count(),
        );

        out.push_str(
            "\n### By kind of request\n\n| kind | sent | ALLOW | DENY | fail-closed | no answer |\n|---|---|---|---|---|---|\n",
        );
        for kind in Kind::ALL {
            let of: Vec<&Record> = r.iter().filter(|x| x.kind == kind).collect();
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} | {} |",
                kind.label(),
                of.len(),
                of.iter().filter(|x| x.decision() == Some("ALLOW")).count(),
                of.iter().filter(|x| x.decision() == Some("DENY")).count(),
                of.iter().filter(|x| x.failed_closed()).count(),
                of.iter().filter(|x| x.decision().is_none()).count(),
            );
        }

        out.push_str(
            "\n## Outages\n\nTimes in seconds from the start of the load. *Down* runs from the process being dead until it serves again after its restart; *recovery* is from then until the first answer that shows the service back (a fresh write ALLOW for Redis and OPA, an answer without the audit suffix for PostgreSQL, any decision for the verifier), counting only requests sent after it was back.\n\n| # | what | at | down | recovery | sent meanwhile | fail-closed | audit suffix | no answer |\n|---|---|---|---|---|---|---|---|---|\n",
        );
        for (i, o) in self.outages.iter().enumerate() {
            let recovery = r
                .iter()
                .filter(|x| x.sent_at >= o.up_at && good(o, x))
                .map(|x| x.answered_at)
                .min_by(f64::total_cmp)
                .map_or("none".to_owned(), |at| {
                    format!("{:.0} ms", (at - o.up_at) * 1000.0)
                });
            let meanwhile: Vec<&Record> = r.iter().filter(|x| during(o, x)).collect();
            let _ = writeln!(
                out,
                "| {} | {} | {:.2} | {:.2} s | {} | {} | {} | {} | {} |",
                i + 1,
                o.target.name(),
                o.down_at,
                o.up_at - o.down_at,
                recovery,
                meanwhile.len(),
                meanwhile.iter().filter(|x| x.failed_closed()).count(),
                meanwhile.iter().filter(|x| x.audit_failed()).count(),
                meanwhile.iter().filter(|x| x.decision().is_none()).count(),
            );
        }

        let _ = write!(
            out,
            "
## Audit trail

| | |
|---|---|
| answers with `\\| audit_append_failed` (spooled at answer time) | {af} |
| `casf_audit_spooled_total`, summed over {procs} verifier processes (each killed one scraped just before its kill) | {spooled} |
| events left in the spool by the verifier killed during the PostgreSQL outage | {left} |
| answered decisions found in the chain | {found} of {answered} |
| of which answered with `\\| audit_append_failed` (drained from the spool) | {found_af} |
| `casf_audit_lost_total` (summed) | {lost} |
| spool depth at the end | {depth} |
| chain length (rows) | {rows} |
| `casf-verifier audit verify` | exit {verify} |

## Invariants

| | |
|---|---|
| wrong ALLOWs | {wrong} |
| answered decisions missing from the chain | {missing} |
| writes decided twice | {twice} |
| chain rows that do not link or recompute | {chain} |
| spooled events of the killed verifier not in the chain exactly once | {left_missing} |
| requests denied fail-closed, then decided afresh on a retry (by design) | {redecided} |
| reads decided more than once (guide §6: a read skips the gate when Redis fails) | {reads_again} |
| writes decided again, first sent while Redis was being killed (asserted 0) | {in_flight_again} |
",
            af = r.iter().filter(|x| x.audit_failed()).count(),
            procs = self.spool.processes,
            spooled = self.spool.spooled,
            left = self.left_spooled,
            found = f.found,
            answered = r.iter().filter(|x| x.decision().is_some()).count(),
            found_af = f.found_after_audit_failure,
            lost = self.spool.lost,
            depth = self.spool.depth,
            rows = self.chain_rows,
            verify = self
                .verify_exit
                .map_or("none (killed)".to_owned(), |c| c.to_string()),
            wrong = f.wrong_allows.len(),
            missing = f.missing.len(),
            twice = f.decided_twice.len(),
            chain = f.chain_errors.len(),
            left_missing = f.left_spooled_missing.len(),
            redecided = f.redecided_after_fail_closed,
            reads_again = f.reads_redecided,
            in_flight_again = f.writes_redecided_in_flight_at_redis_kill.len(),
        );
        let mut samples: BTreeMap<String, usize> = BTreeMap::new();
        for x in r {
            let sample = match &x.answer {
                Answer::Status { status, body } => format!("HTTP {status}: {body}"),
                Answer::Failed { error, connect } => {
                    format!("{}{error}", if *connect { "connect: " } else { "" })
                }
                Answer::Decided { .. } => continue,
            };
            *samples.entry(sample).or_default() += 1;
        }
        if !samples.is_empty() {
            out.push_str("\n### Requests not decided, by error (first 10 kinds)\n\n");
            for (sample, n) in samples.iter().take(10) {
                let _ = writeln!(out, "- {n} × `{}`", sample.replace('`', "'"));
            }
        }
        let verify_line = self
            .verify_output
            .lines()
            .rfind(|l| !l.trim().is_empty())
            .unwrap_or_default();
        let _ = writeln!(out, "\n`audit verify` said: `{}`", verify_line.trim());
        for (title, list) in [
            ("Wrong ALLOWs", &f.wrong_allows),
            ("Missing rows", &f.missing),
            ("Decided twice", &f.decided_twice),
            (
                "Writes decided again after Redis died while they were in flight",
                &f.writes_redecided_in_flight_at_redis_kill,
            ),
            ("Chain errors", &f.chain_errors),
            ("Spooled events not drained once", &f.left_spooled_missing),
        ] {
            if !list.is_empty() {
                let _ = writeln!(out, "\n### {title} (first 20)\n");
                for line in list.iter().take(20) {
                    let _ = writeln!(out, "- {line}");
                }
            }
        }
        out
    }
}
