//! What the answers and the chain must satisfy, whatever the timing: each
//! check yields the offending requests (empty is a pass), so a failure names
//! them and the report can count them.

use std::collections::{HashMap, HashSet};

use crate::chain_rule::recompute;
use crate::helpers::AuditRow;
use crate::load::{Answer, Record};
use crate::{Outage, Target};
use serde_json::Value;

const REPLAY_ACTION: &str = "REPLAY_DETECTED";

#[derive(Default)]
pub struct Findings {
    pub wrong_allows: Vec<String>,
    pub missing: Vec<String>,
    pub decided_twice: Vec<String>,
    pub chain_errors: Vec<String>,
    /// Events a killed verifier left in its spool that are not in the chain
    /// exactly once.
    pub left_spooled_missing: Vec<String>,
    /// Requests denied fail-closed, then decided afresh on a retry once the
    /// dependency was back (by design: a fail-closed deny is not stored).
    pub redecided_after_fail_closed: usize,
    /// Reads decided more than once: when the state store fails for a read
    /// (Redis down, or over its 200 ms budget), the guide (§6) has the read
    /// skip the anti-replay gate, so it is neither looked up nor remembered.
    pub reads_redecided: usize,
    /// Writes decided again whose first request was in flight when Redis
    /// was killed: claimed before, so the decision could not be stored and
    /// its claim stayed pending; a replay after the pending TTL is decided
    /// afresh. The guide (§6) allows it ("worst case: duplicate processing
    /// of in-flight requests"); issue 11 item 1 does not, so the Redis store
    /// retries the store until the claim expires, and the test asserts none.
    pub writes_redecided_in_flight_at_redis_kill: Vec<String>,
    /// Answered decisions found in the chain, of which answered with the
    /// `| audit_append_failed` suffix (so drained from a spool).
    pub found: usize,
    pub found_after_audit_failure: usize,
}

/// Whether the request itself must be denied, whatever else happens: the
/// hard invariants (KILL_SWITCH denies everything, READ_ONLY every write)
/// and the policy (a write needs a tenant; reads without one are not sent).
pub fn must_deny(body: &Value) -> bool {
    let write = !matches!(
        body["tool"].as_str(),
        Some("cliniccloud.list_appointments" | "cliniccloud.summary_history")
    );
    let mode = body["mode"].as_str().unwrap_or_default();
    let tenant = body["context"]["tenant_id"]
        .as_str()
        .is_some_and(|t| !t.is_empty());
    mode == "KILL_SWITCH" || (write && (mode != "ALLOW" || !tenant))
}

fn payload(row: &AuditRow) -> Value {
    serde_json::from_str(&row.payload).unwrap_or(Value::Null)
}

fn row_violations(payload: &Value) -> Vec<String> {
    payload["response"]["violations"]
        .as_array()
        .map(|v| {
            v.iter()
                .filter_map(|s| s.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

impl Findings {
    pub fn check(
        records: &[Record],
        outages: &[Outage],
        rows: &[AuditRow],
        left_spooled: &[String],
    ) -> Findings {
        let mut f = Findings::default();
        f.check_answers(records, outages);
        // Requests in flight while Redis was being killed.
        let in_flight: HashSet<&str> = records
            .iter()
            .filter(|r| {
                outages.iter().any(|o| {
                    o.target == Target::Redis && r.sent_at < o.down_at && r.answered_at >= o.kill_at
                })
            })
            .map(Record::request_id)
            .collect();
        f.check_chain_decisions(rows, &in_flight);
        f.check_missing(records, rows);
        f.check_chain(rows);
        let mut by_event: HashMap<&str, usize> = HashMap::new();
        for row in rows {
            *by_event.entry(row.event_id.as_str()).or_default() += 1;
        }
        for id in left_spooled {
            let n = by_event.get(id.as_str()).copied().unwrap_or(0);
            if n != 1 {
                f.left_spooled_missing
                    .push(format!("event {id}: {n} rows in the chain"));
            }
        }
        f
    }

    /// Wrong ALLOWs among the answers: a request that must be denied; a
    /// write decided while Redis or OPA was down from before it was sent
    /// until after it was answered (only a replay of a stored ALLOW may be
    /// answered ALLOW without OPA: it is not decided again); and a second
    /// SMS allowed to one patient within the hour.
    fn check_answers(&mut self, records: &[Record], outages: &[Outage]) {
        let mut first_allow: HashMap<&str, f64> = HashMap::new();
        for r in records {
            if r.decision() == Some("ALLOW") {
                let at = first_allow.entry(r.request_id()).or_insert(r.answered_at);
                *at = at.min(r.answered_at);
            }
        }
        let mut sms: HashMap<&str, HashSet<&str>> = HashMap::new();
        for r in records {
            if r.decision() != Some("ALLOW") {
                continue;
            }
            if must_deny(&r.body) {
                self.wrong_allows.push(format!(
                    "#{} {}: ALLOW for {}",
                    r.seq,
                    r.request_id(),
                    r.body
                ));
            }
            if r.is_write() {
                for o in outages {
                    let inside = r.sent_at >= o.down_at && r.answered_at <= o.restart_at;
                    let stored_allow = first_allow
                        .get(r.request_id())
                        .is_some_and(|at| *at < r.sent_at);
                    let wrong = match o.target {
                        Target::Redis => inside,
                        Target::Opa => inside && !stored_allow,
                        Target::Postgres | Target::Verifier => false,
                    };
                    if wrong {
                        self.wrong_allows.push(format!(
                            "#{} {}: write ALLOW while {} was down ({:.3}..{:.3}s)",
                            r.seq,
                            r.request_id(),
                            o.target.name(),
                            o.down_at,
                            o.restart_at
                        ));
                    }
                }
            }
            if r.tool() == "twilio.send_sms" {
                let patient = r.body["subject"]["patient_id"].as_str().unwrap_or_default();
                sms.entry(patient).or_default().insert(r.request_id());
            }
        }
        for (patient, ids) in sms {
            if ids.len() > 1 {
                self.wrong_allows.push(format!(
                    "patient {patient}: SMS allowed under {} request_ids: {ids:?}",
                    ids.len()
                ));
            }
        }
    }

    /// The same on the chain, which also holds decisions whose answer never
    /// arrived (the verifier killed mid-request): no ALLOW for a request that
    /// must be denied, one SMS per patient; and no write decided twice
    /// (reads decided again are counted: the guide lets them skip the gate
    /// when Redis fails).
    fn check_chain_decisions(
        &mut self,
        rows: &[AuditRow],
        in_flight_at_redis_kill: &HashSet<&str>,
    ) {
        let mut sms: HashMap<String, HashSet<&str>> = HashMap::new();
        // (decisions, fail-closed denies, and whether it is a read)
        let mut decided: HashMap<&str, (usize, usize, bool)> = HashMap::new();
        let mut seen: HashMap<&str, Vec<String>> = HashMap::new();
        for row in rows {
            let payload = payload(row);
            if row.decision == "ALLOW" && must_deny(&payload["request"]) {
                self.wrong_allows.push(format!(
                    "row {} {}: ALLOW in the chain for {}",
                    row.id, row.request_id, payload["request"]
                ));
            }
            if row.action == REPLAY_ACTION {
                continue;
            }
            if row.action == "twilio.send_sms" && row.decision == "ALLOW" {
                let patient = payload["request"]["subject"]["patient_id"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned();
                sms.entry(patient).or_default().insert(&row.request_id);
            }
            seen.entry(&row.request_id).or_default().push(format!(
                "row {} {} {} {:?}",
                row.id,
                row.ts,
                row.decision,
                row_violations(&payload)
            ));
            let entry = decided.entry(&row.request_id).or_default();
            entry.2 = matches!(
                row.action.as_str(),
                "cliniccloud.list_appointments" | "cliniccloud.summary_history"
            );
            if row_violations(&payload).iter().any(|v| v == "FAIL_CLOSED") {
                entry.1 += 1;
            } else {
                entry.0 += 1;
            }
        }
        for (patient, ids) in sms {
            if ids.len() > 1 {
                self.wrong_allows.push(format!(
                    "patient {patient}: {} SMS ALLOW rows in the chain",
                    ids.len()
                ));
            }
        }
        for (request_id, (real, fail_closed, read)) in decided {
            if real > 1 && read {
                self.reads_redecided += 1;
            } else if real > 1 && in_flight_at_redis_kill.contains(request_id) {
                self.writes_redecided_in_flight_at_redis_kill
                    .push(format!("{request_id}: {:?}", seen[request_id]));
            } else if real > 1 {
                self.decided_twice.push(format!(
                    "{request_id}: {real} decisions in the chain: {:?}",
                    seen[request_id]
                ));
            }
            if fail_closed > 0 && real + fail_closed > 1 {
                self.redecided_after_fail_closed += 1;
            }
        }
    }

    /// Every answered decision has its row: same request_id, decision and
    /// violations (as many rows as answers, replays included).
    fn check_missing(&mut self, records: &[Record], rows: &[AuditRow]) {
        let mut in_chain: HashMap<(String, String, Vec<String>), usize> = HashMap::new();
        for row in rows {
            let key = (
                row.request_id.clone(),
                row.decision.clone(),
                row_violations(&payload(row)),
            );
            *in_chain.entry(key).or_default() += 1;
        }
        for r in records {
            let Answer::Decided {
                decision,
                violations,
                ..
            } = &r.answer
            else {
                continue;
            };
            let key = (
                r.request_id().to_owned(),
                decision.clone(),
                violations.clone(),
            );
            match in_chain.get_mut(&key) {
                Some(n) if *n > 0 => {
                    *n -= 1;
                    self.found += 1;
                    if r.audit_failed() {
                        self.found_after_audit_failure += 1;
                    }
                }
                _ => self.missing.push(format!(
                    "#{} {} answered {decision} {violations:?} at {:.3}s: no row",
                    r.seq,
                    r.request_id(),
                    r.answered_at
                )),
            }
        }
    }

    /// Linked from genesis, each hash recomputed from its columns, each
    /// event once.
    fn check_chain(&mut self, rows: &[AuditRow]) {
        let mut prev = String::new();
        let mut events = HashSet::new();
        for row in rows {
            if row.prev_hash != prev {
                self.chain_errors
                    .push(format!("row {}: prev_hash does not link", row.id));
            }
            if recompute(row) != row.hash {
                self.chain_errors
                    .push(format!("row {}: hash does not recompute", row.id));
            }
            if !events.insert(row.event_id.as_str()) {
                self.chain_errors
                    .push(format!("row {}: event {} twice", row.id, row.event_id));
            }
            prev.clone_from(&row.hash);
        }
    }
}
