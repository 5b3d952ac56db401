//! Callers (`CASF_CALLERS`): who may call, and what each may claim.
//!
//! Without it, anyone who reaches a door can claim any role and tenant. With
//! it, every call must come from a known caller (an API key as
//! `Authorization: Bearer`, a verified mTLS client certificate's SAN, or on
//! the Envoy door a verified JWT's `sub`), and the pipeline denies a claim
//! outside that caller's grants. Doors only resolve the credential to a
//! [`Caller`] and attach it to the request; the grant check is the
//! pipeline's (see `Pipeline::run`), so both doors enforce it identically.
//!
//! Keys are never stored: the file holds their SHA-256, and a presented key
//! is hashed and compared with every entry in constant time. The file is
//! re-read when it changes; a new version that does not parse is refused
//! and the one in force kept, so a botched edit never opens the door.
//!
//! The doors find the transport's proof of the peer as a
//! [`PeerIdentity`] in the request's extensions (set per connection by the
//! door's TLS acceptor); without one, only keys and JWT subjects identify.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use serde::Deserialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::domain::{Role, Tool, VerifyRequest};
use crate::metrics::Metrics;
use crate::peer::PeerIdentity;

/// Violation codes of a claim outside the caller's grants.
pub mod violation {
    pub const ROLE_NOT_GRANTED: &str = "Caller_RoleNotGranted";
    pub const TENANT_NOT_GRANTED: &str = "Caller_TenantNotGranted";
    pub const TOOL_NOT_GRANTED: &str = "Caller_ToolNotGranted";
    /// A door handed the pipeline no caller although `CASF_CALLERS` is set.
    /// Doors answer 401 before that; this is the pipeline's own guard.
    pub const UNAUTHENTICATED: &str = "Caller_Unauthenticated";
}

/// Whether `code` is one of [`violation`]'s: a claim outside the caller's
/// grants, which shadow mode never answers ALLOW.
pub fn is_grant_violation(code: &str) -> bool {
    [
        violation::ROLE_NOT_GRANTED,
        violation::TENANT_NOT_GRANTED,
        violation::TOOL_NOT_GRANTED,
        violation::UNAUTHENTICATED,
    ]
    .contains(&code)
}

/// How often the callers file is checked for a change.
pub const POLL_INTERVAL: Duration = Duration::from_millis(500);

/// The `sub` claim of a verified JWT names the caller on the Envoy door.
pub const JWT_SUBJECT_CLAIM: &str = "sub";

/// One caller and its grants.
#[derive(Clone, PartialEq, Eq)]
pub struct Caller {
    pub name: String,
    key_sha256: Option<[u8; 32]>,
    /// A URI or DNS SAN its client certificate must carry.
    pub peer: Option<String>,
    /// The `sub` of its verified JWT (Envoy door).
    pub subject: Option<String>,
    roles: HashSet<Role>,
    tenants: HashSet<String>,
    /// `None`: every tool.
    tools: Option<HashSet<Tool>>,
    /// May read and set the mode floor (`/admin/mode`).
    pub operator: bool,
}

impl std::fmt::Debug for Caller {
    // The name says who it is; the rest is configuration, not evidence.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Caller")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl Caller {
    /// The grant violations of `request`, in role, tenant, tool order. A
    /// request that names no tenant is outside a caller's tenant grants.
    pub fn grant_violations(&self, request: &VerifyRequest) -> Vec<&'static str> {
        let mut found = Vec::new();
        if !self.roles.contains(&request.role) {
            found.push(violation::ROLE_NOT_GRANTED);
        }
        let tenant = request
            .context
            .get("tenant_id")
            .and_then(serde_json::Value::as_str);
        if !tenant.is_some_and(|t| self.tenants.contains(t)) {
            found.push(violation::TENANT_NOT_GRANTED);
        }
        if self
            .tools
            .as_ref()
            .is_some_and(|tools| !tools.contains(&request.tool))
        {
            found.push(violation::TOOL_NOT_GRANTED);
        }
        found
    }
}

/// The replay fingerprint of a request made by `caller`: a `request_id`
/// belongs to the caller who used it first, so another caller reusing it
/// (even with the same body) is a payload mismatch, never someone else's
/// stored decision. Without callers it is the guide's fingerprint.
pub fn bind_fingerprint(fingerprint: String, caller: Option<&str>) -> String {
    match caller {
        None => fingerprint,
        Some(name) => {
            let mut hasher = Sha256::new();
            hasher.update(fingerprint.as_bytes());
            hasher.update(b"\ncaller:");
            hasher.update(name.as_bytes());
            hex::encode(hasher.finalize())
        }
    }
}

/// Why a call was not let in as a caller. Bounded: a metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Unauthenticated {
    /// No credential at all.
    Missing,
    /// A key (or a malformed `Authorization`) that matches no caller, or a
    /// key presented without the client certificate its caller requires.
    Invalid,
    /// A verified certificate or JWT subject that names no caller.
    Unknown,
}

impl Unauthenticated {
    pub const ALL: [Unauthenticated; 3] = [
        Unauthenticated::Missing,
        Unauthenticated::Invalid,
        Unauthenticated::Unknown,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Unauthenticated::Missing => "missing",
            Unauthenticated::Invalid => "invalid",
            Unauthenticated::Unknown => "unknown",
        }
    }

    /// The `detail` of the 401 answer. It never repeats what was presented.
    pub fn detail(self) -> &'static str {
        match self {
            Unauthenticated::Missing => {
                "caller not authenticated: send Authorization: Bearer <key> or a client certificate"
            }
            Unauthenticated::Invalid => "caller not authenticated: credential not recognised",
            Unauthenticated::Unknown => {
                "caller not authenticated: the verified identity is not a configured caller"
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CallersError {
    #[error("cannot read {path}: {reason}")]
    Unreadable { path: String, reason: String },
    #[error("{path}: {reason}")]
    Invalid { path: String, reason: String },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    callers: Vec<RawCaller>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCaller {
    name: String,
    #[serde(default)]
    api_key_sha256: Option<String>,
    #[serde(default)]
    peer: Option<String>,
    #[serde(default)]
    subject: Option<String>,
    #[serde(default)]
    roles: Vec<String>,
    #[serde(default)]
    tenants: Vec<String>,
    #[serde(default)]
    tools: Option<Vec<String>>,
    #[serde(default)]
    operator: bool,
}

/// One version of the callers file, checked in full.
#[derive(Debug, Default)]
pub struct CallerSet {
    callers: Vec<Arc<Caller>>,
}

/// 64 hex digits. The value is never echoed: a key pasted here by mistake
/// must not end up in a log.
fn parse_hash(raw: &str, field: &str) -> Result<[u8; 32], String> {
    let raw = raw.trim();
    let mut out = [0u8; 32];
    if raw.len() != 64 || hex::decode_to_slice(raw, &mut out).is_err() {
        return Err(format!(
            "{field}: expected 64 hex digits, the SHA-256 of the key (the value is not shown)"
        ));
    }
    Ok(out)
}

fn non_empty(value: Option<String>, field: &str) -> Result<Option<String>, String> {
    match value {
        Some(v) if v.trim().is_empty() => Err(format!("{field}: is empty")),
        other => Ok(other),
    }
}

impl CallerSet {
    pub fn parse(text: &str) -> Result<Self, String> {
        let raw: RawFile = serde_norway::from_str(text).map_err(|e| e.to_string())?;
        let mut names = HashSet::new();
        let mut keys = HashSet::new();
        let mut peers = HashSet::new();
        let mut subjects = HashSet::new();
        let mut callers = Vec::with_capacity(raw.callers.len());
        for (index, raw) in raw.callers.into_iter().enumerate() {
            let at = |field: &str| format!("callers[{index}].{field}");
            let name = raw.name.trim().to_owned();
            if name.is_empty() {
                return Err(format!("{}: is empty", at("name")));
            }
            if !names.insert(name.clone()) {
                return Err(format!("{}: duplicate name {name:?}", at("name")));
            }
            let key_sha256 = raw
                .api_key_sha256
                .as_deref()
                .map(|h| parse_hash(h, &at("api_key_sha256")))
                .transpose()?;
            if let Some(hash) = key_sha256
                && !keys.insert(hash)
            {
                return Err(format!(
                    "{}: the same key as another caller",
                    at("api_key_sha256")
                ));
            }
            let peer = non_empty(raw.peer, &at("peer"))?;
            if let Some(peer) = &peer
                && !peers.insert(peer.clone())
            {
                return Err(format!("{}: duplicate peer {peer:?}", at("peer")));
            }
            let subject = non_empty(raw.subject, &at("subject"))?;
            if let Some(subject) = &subject
                && !subjects.insert(subject.clone())
            {
                return Err(format!("{}: duplicate subject {subject:?}", at("subject")));
            }
            if key_sha256.is_none() && peer.is_none() && subject.is_none() {
                return Err(format!(
                    "callers[{index}]: needs api_key_sha256, peer or subject to be recognised"
                ));
            }
            let roles = raw
                .roles
                .iter()
                .enumerate()
                .map(|(i, r)| {
                    Role::parse(r).map_err(|e| format!("{}: {e}", at(&format!("roles[{i}]"))))
                })
                .collect::<Result<_, _>>()?;
            let tenants = raw
                .tenants
                .into_iter()
                .enumerate()
                .map(|(i, t)| match t.trim() {
                    "" => Err(format!("{}: is empty", at(&format!("tenants[{i}]")))),
                    _ => Ok(t),
                })
                .collect::<Result<_, _>>()?;
            let tools = raw
                .tools
                .map(|tools| {
                    tools
                        .iter()
                        .enumerate()
                        .map(|(i, t)| {
                            Tool::parse(t)
                                .map_err(|e| format!("{}: {e}", at(&format!("tools[{i}]"))))
                        })
                        .collect::<Result<HashSet<_>, _>>()
                })
                .transpose()?;
            callers.push(Arc::new(Caller {
                name,
                key_sha256,
                peer,
                subject,
                roles,
                tenants,
                tools,
                operator: raw.operator,
            }));
        }
        Ok(CallerSet { callers })
    }

    pub fn load(path: &Path) -> Result<Self, CallersError> {
        read_set(path).map(|(set, _)| set)
    }

    pub fn len(&self) -> usize {
        self.callers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.callers.is_empty()
    }

    /// How many callers may change the mode floor.
    pub fn operators(&self) -> usize {
        self.callers.iter().filter(|c| c.operator).count()
    }

    /// The caller whose key hashes to `key`'s SHA-256. Every entry is
    /// compared, in constant time, whether or not one matched earlier.
    fn by_key(&self, key: &str) -> Option<&Arc<Caller>> {
        let presented: [u8; 32] = Sha256::digest(key.as_bytes()).into();
        let mut found = None;
        for caller in &self.callers {
            if let Some(hash) = &caller.key_sha256
                && bool::from(hash.ct_eq(&presented))
            {
                found = Some(caller);
            }
        }
        found
    }

    fn by_peer(&self, peer: Option<&PeerIdentity>) -> Option<&Arc<Caller>> {
        let sans = &peer?.sans;
        self.callers
            .iter()
            .find(|c| c.peer.as_ref().is_some_and(|p| sans.contains(p)))
    }

    /// The caller of an HTTP request: its `Authorization` header, else its
    /// client certificate. A caller configured with both a key and a peer
    /// must present both.
    pub fn authenticate_http(
        &self,
        authorization: Option<&str>,
        peer: Option<&PeerIdentity>,
    ) -> Result<Arc<Caller>, Unauthenticated> {
        if let Some(value) = authorization {
            let key = bearer_token(value).ok_or(Unauthenticated::Invalid)?;
            let caller = self.by_key(key).ok_or(Unauthenticated::Invalid)?;
            let peer_ok = match &caller.peer {
                None => true,
                Some(required) => peer.is_some_and(|p| p.sans.contains(required)),
            };
            return match peer_ok {
                true => Ok(caller.clone()),
                false => Err(Unauthenticated::Invalid),
            };
        }
        if peer.is_some_and(PeerIdentity::is_certified) {
            return match self.by_peer(peer) {
                Some(caller) if caller.key_sha256.is_some() => Err(Unauthenticated::Missing),
                Some(caller) => Ok(caller.clone()),
                None => Err(Unauthenticated::Unknown),
            };
        }
        Err(Unauthenticated::Missing)
    }

    /// The caller of an Envoy Check: the verified JWT's subject, else the
    /// gRPC peer's client certificate. A subject that names no caller is
    /// refused rather than falling back to the peer (Envoy itself).
    pub fn authenticate_envoy(
        &self,
        jwt_subject: Option<&str>,
        peer: Option<&PeerIdentity>,
    ) -> Result<Arc<Caller>, Unauthenticated> {
        if let Some(subject) = jwt_subject {
            return self
                .callers
                .iter()
                .find(|c| c.subject.as_deref() == Some(subject))
                .cloned()
                .ok_or(Unauthenticated::Unknown);
        }
        if peer.is_some_and(PeerIdentity::is_certified) {
            return self.by_peer(peer).cloned().ok_or(Unauthenticated::Unknown);
        }
        Err(Unauthenticated::Missing)
    }
}

/// The callers `path` holds, and its content as read.
fn read_set(path: &Path) -> Result<(CallerSet, Vec<u8>), CallersError> {
    let bytes = std::fs::read(path).map_err(|e| CallersError::Unreadable {
        path: crate::config::shown_path(path),
        reason: e.to_string(),
    })?;
    let invalid = |reason: String| CallersError::Invalid {
        path: crate::config::shown_path(path),
        reason,
    };
    let text = std::str::from_utf8(&bytes).map_err(|_| invalid("not UTF-8".into()))?;
    let set = CallerSet::parse(text).map_err(invalid)?;
    Ok((set, bytes))
}

/// The key of `Bearer <key>` (scheme case-insensitive), if that is the form.
fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim().split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// The callers in force, replaced whole when the file changes.
pub struct Callers {
    path: PathBuf,
    current: RwLock<Arc<CallerSet>>,
    /// The file's content as loaded at startup, so that a change made before
    /// [`Callers::follow`] starts is still seen as one.
    loaded: Vec<u8>,
}

impl Callers {
    /// Loads `path`; a file that is missing or invalid refuses to start.
    pub fn load(path: &Path) -> Result<Self, CallersError> {
        let (set, loaded) = read_set(path)?;
        Ok(Callers {
            path: path.to_owned(),
            current: RwLock::new(Arc::new(set)),
            loaded,
        })
    }

    /// A fixed set, for tests.
    pub fn fixed(set: CallerSet) -> Self {
        Callers {
            path: PathBuf::new(),
            current: RwLock::new(Arc::new(set)),
            loaded: Vec::new(),
        }
    }

    /// The set in force now.
    pub fn current(&self) -> Arc<CallerSet> {
        match self.current.read() {
            Ok(guard) => guard.clone(),
            // A writer panicked mid-swap; the Arc it held is still whole.
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    fn replace(&self, set: CallerSet) {
        let set = Arc::new(set);
        match self.current.write() {
            Ok(mut guard) => *guard = set,
            Err(poisoned) => *poisoned.into_inner() = set,
        }
    }

    /// Follows the file until `stop` resolves: a changed file that parses
    /// replaces the callers; one that does not is refused (logged once per
    /// distinct problem, counted) and the callers in force stay.
    pub async fn follow(self: Arc<Self>, metrics: Arc<Metrics>, stop: impl Future<Output = ()>) {
        let mut stop = std::pin::pin!(stop);
        let mut ticker = tokio::time::interval(POLL_INTERVAL);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut seen = Some(self.loaded.clone());
        let mut last_problem: Option<String> = None;
        loop {
            tokio::select! {
                _ = &mut stop => return,
                _ = ticker.tick() => {}
            }
            // The content, not the mtime: a rewrite within the mtime's
            // resolution, or a symlink swap (Kubernetes ConfigMaps), is seen.
            if let Ok(bytes) = std::fs::read(&self.path)
                && seen.as_ref() == Some(&bytes)
            {
                continue;
            }
            match read_set(&self.path) {
                Ok((set, bytes)) => {
                    tracing::warn!(callers = set.len(), "CASF_CALLERS reloaded");
                    self.replace(set);
                    metrics.callers_reloaded(true);
                    seen = Some(bytes);
                    last_problem = None;
                }
                Err(error) => {
                    let problem = error.to_string();
                    if last_problem.as_deref() != Some(problem.as_str()) {
                        tracing::error!(%problem, "CASF_CALLERS change refused: the callers in force stay");
                        metrics.callers_reloaded(false);
                        last_problem = Some(problem);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn sha(key: &str) -> String {
        hex::encode(Sha256::digest(key.as_bytes()))
    }

    fn set() -> CallerSet {
        CallerSet::parse(&format!(
            "callers:
  - name: scheduling-agent
    api_key_sha256: {}
    roles: [receptionist]
    tenants: [clinic-a]
    tools: [cliniccloud.create_appointment, cliniccloud.list_appointments]
  - name: bound
    api_key_sha256: {}
    peer: spiffe://clinic/bound
    roles: [nurse]
    tenants: [clinic-a]
  - name: mesh
    peer: spiffe://clinic/mesh
    subject: user-7
    roles: [doctor]
    tenants: [clinic-b]
  - name: on-call
    api_key_sha256: {}
    operator: true
",
            sha("k-sched"),
            sha("k-bound").to_uppercase(),
            sha("k-oncall")
        ))
        .unwrap()
    }

    fn request(role: &str, tenant: Option<&str>, tool: &str) -> VerifyRequest {
        let context = match tenant {
            Some(t) => json!({"tenant_id": t}),
            None => json!({}),
        };
        VerifyRequest::from_value(json!({"request_id": "r", "tool": tool, "mode": "ALLOW",
            "role": role, "subject": {"patient_id": "p"}, "args": {}, "context": context}))
        .unwrap()
    }

    fn peer(san: &str) -> PeerIdentity {
        PeerIdentity {
            sans: vec![san.to_owned()],
            remote: None,
        }
    }

    #[test]
    fn keys_resolve_by_hash_and_bad_ones_are_told_apart() {
        let set = set();
        let name = |r: Result<Arc<Caller>, Unauthenticated>| r.map(|c| c.name.clone());
        assert_eq!(
            name(set.authenticate_http(Some("Bearer k-sched"), None)),
            Ok("scheduling-agent".into())
        );
        assert_eq!(
            name(set.authenticate_http(Some("bearer  k-sched "), None)),
            Ok("scheduling-agent".into())
        );
        assert_eq!(
            name(set.authenticate_http(Some("Bearer nope"), None)),
            Err(Unauthenticated::Invalid)
        );
        assert_eq!(
            name(set.authenticate_http(Some("Basic k-sched"), None)),
            Err(Unauthenticated::Invalid)
        );
        assert_eq!(
            name(set.authenticate_http(None, None)),
            Err(Unauthenticated::Missing)
        );
        // A key bound to a certificate needs the certificate too.
        assert_eq!(
            name(set.authenticate_http(Some("Bearer k-bound"), None)),
            Err(Unauthenticated::Invalid)
        );
        assert_eq!(
            name(
                set.authenticate_http(Some("Bearer k-bound"), Some(&peer("spiffe://clinic/bound")))
            ),
            Ok("bound".into())
        );
        // ... and the certificate alone is not enough.
        assert_eq!(
            name(set.authenticate_http(None, Some(&peer("spiffe://clinic/bound")))),
            Err(Unauthenticated::Missing)
        );
        assert_eq!(
            name(set.authenticate_http(None, Some(&peer("spiffe://clinic/mesh")))),
            Ok("mesh".into())
        );
        assert_eq!(
            name(set.authenticate_http(None, Some(&peer("spiffe://other")))),
            Err(Unauthenticated::Unknown)
        );
    }

    #[test]
    fn the_envoy_door_takes_the_jwt_subject_then_the_peer() {
        let set = set();
        let name = |r: Result<Arc<Caller>, Unauthenticated>| r.map(|c| c.name.clone());
        assert_eq!(
            name(set.authenticate_envoy(Some("user-7"), None)),
            Ok("mesh".into())
        );
        // An unknown subject does not fall back to the peer.
        assert_eq!(
            name(set.authenticate_envoy(Some("user-8"), Some(&peer("spiffe://clinic/mesh")))),
            Err(Unauthenticated::Unknown)
        );
        assert_eq!(
            name(set.authenticate_envoy(None, Some(&peer("spiffe://clinic/mesh")))),
            Ok("mesh".into())
        );
        assert_eq!(
            name(set.authenticate_envoy(None, None)),
            Err(Unauthenticated::Missing)
        );
    }

    #[test]
    fn grants_cover_role_tenant_and_tool() {
        let set = set();
        let sched = set.authenticate_http(Some("Bearer k-sched"), None).unwrap();
        let create = "cliniccloud.create_appointment";
        assert!(
            sched
                .grant_violations(&request("receptionist", Some("clinic-a"), create))
                .is_empty()
        );
        assert_eq!(
            sched.grant_violations(&request("doctor", Some("clinic-a"), create)),
            [violation::ROLE_NOT_GRANTED]
        );
        assert_eq!(
            sched.grant_violations(&request("receptionist", Some("clinic-b"), create)),
            [violation::TENANT_NOT_GRANTED]
        );
        assert_eq!(
            sched.grant_violations(&request("receptionist", None, create)),
            [violation::TENANT_NOT_GRANTED]
        );
        assert_eq!(
            sched.grant_violations(&request("doctor", Some("x"), "stripe.generate_invoice")),
            [
                violation::ROLE_NOT_GRANTED,
                violation::TENANT_NOT_GRANTED,
                violation::TOOL_NOT_GRANTED
            ]
        );
        // No tools listed: every tool. No roles or tenants: nothing.
        let mesh = set.authenticate_envoy(Some("user-7"), None).unwrap();
        assert!(
            mesh.grant_violations(&request(
                "doctor",
                Some("clinic-b"),
                "stripe.generate_invoice"
            ))
            .is_empty()
        );
        let on_call = set
            .authenticate_http(Some("Bearer k-oncall"), None)
            .unwrap();
        assert!(on_call.operator);
        assert_eq!(
            on_call
                .grant_violations(&request("nurse", Some("clinic-a"), create))
                .len(),
            2
        );
    }

    #[test]
    fn a_bad_file_is_refused_naming_the_field() {
        let key = sha("k");
        let cases = [
            (
                format!("callers: [{{name: a, api_key_sha256: {key}, colour: red}}]"),
                "unknown field `colour`",
            ),
            (
                "callers: [{name: a, api_key_sha256: not-a-hash}]".to_owned(),
                "callers[0].api_key_sha256: expected 64 hex digits",
            ),
            (
                format!("callers: [{{name: a, api_key_sha256: {}}}]", &key[..63]),
                "callers[0].api_key_sha256",
            ),
            (
                format!("callers: [{{name: a, api_key_sha256: {key}}}, {{name: a, peer: x}}]"),
                "callers[1].name: duplicate name",
            ),
            (
                format!(
                    "callers: [{{name: a, api_key_sha256: {key}}}, {{name: b, api_key_sha256: {key}}}]"
                ),
                "callers[1].api_key_sha256: the same key",
            ),
            (
                "callers: [{name: a, roles: [nurse]}]".to_owned(),
                "callers[0]: needs api_key_sha256, peer or subject",
            ),
            (
                "callers: [{name: a, peer: x, roles: [surgeon]}]".to_owned(),
                "callers[0].roles[0]",
            ),
            (
                "callers: [{name: a, peer: x, tools: [rm.rf]}]".to_owned(),
                "callers[0].tools[0]",
            ),
            (
                "callers: [{name: ' ', peer: x}]".to_owned(),
                "callers[0].name: is empty",
            ),
            ("users: []".to_owned(), "unknown field `users`"),
        ];
        for (text, expected) in cases {
            let error = CallerSet::parse(&text).unwrap_err();
            assert!(error.contains(expected), "{text}: {error}");
        }
        // The value of a malformed hash is not echoed (it may be the key).
        let error =
            CallerSet::parse("callers: [{name: a, api_key_sha256: hunter2-secret}]").unwrap_err();
        assert!(!error.contains("hunter2"), "{error}");
    }

    #[test]
    fn fingerprints_are_bound_to_the_caller() {
        let fp = "abc".to_owned();
        assert_eq!(bind_fingerprint(fp.clone(), None), fp);
        let a = bind_fingerprint(fp.clone(), Some("a"));
        assert_ne!(a, fp);
        assert_ne!(a, bind_fingerprint(fp.clone(), Some("b")));
        assert_eq!(a, bind_fingerprint(fp, Some("a")));
    }

    #[tokio::test]
    async fn a_changed_file_is_followed_and_a_broken_one_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("callers.yaml");
        std::fs::write(
            &path,
            format!("callers: [{{name: a, api_key_sha256: {}}}]", sha("ka")),
        )
        .unwrap();
        let callers = Arc::new(Callers::load(&path).unwrap());
        let metrics = Arc::new(Metrics::new());
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let follower = tokio::spawn(callers.clone().follow(metrics.clone(), async move {
            let _ = stop_rx.await;
        }));
        let until = |key: &'static str, ok: bool| {
            let callers = callers.clone();
            async move {
                tokio::time::timeout(Duration::from_secs(10), async {
                    while callers
                        .current()
                        .authenticate_http(Some(&format!("Bearer {key}")), None)
                        .is_ok()
                        != ok
                    {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                })
                .await
                .unwrap_or_else(|_| panic!("{key} never became {ok}"))
            }
        };
        until("ka", true).await;
        std::fs::write(
            &path,
            format!("callers: [{{name: b, api_key_sha256: {}}}]", sha("kb")),
        )
        .unwrap();
        until("kb", true).await;
        until("ka", false).await;
        std::fs::write(&path, "callers: [{name: c, api_key_sha256: zz}]").unwrap();
        tokio::time::timeout(Duration::from_secs(10), async {
            while !metrics
                .encode()
                .contains("casf_callers_reload_total{result=\"refused\"} 1")
            {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .expect("the broken file was refused");
        assert!(
            callers
                .current()
                .authenticate_http(Some("Bearer kb"), None)
                .is_ok()
        );
        let _ = stop_tx.send(());
        follower.await.unwrap();
    }
}
