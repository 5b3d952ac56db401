//! The policy in force, replaceable while serving.
//!
//! Changing policy must neither drop requests nor let a broken policy in.
//! A [`PolicySet`] is the Rego policy (or the OPA engine), the route map and
//! the hash that names them, built and checked as one unit; [`LivePolicy`]
//! holds the current one and swaps it atomically. A decision takes the
//! current set once as it starts and keeps it to the end (its audit row
//! names that set's hash), so in-flight decisions finish on the old policy
//! while new ones start on the new.
//!
//! A candidate is refused, and the old set keeps serving, unless its files
//! compile, every `test_*` rule in them passes, a smoke input evaluates and
//! the route map parses. [`follow`] reloads on `SIGHUP` and whenever the
//! files' content hash changes (polled every [`POLL_INTERVAL`]).
//!
//! The hash (`policy.hash` in every audit row, `casf_policy_info`) is
//! SHA-256 over, for each `*.rego` file of the directory in byte order of
//! file name: `"policy " + name + "\n" + decimal byte length + "\n" + bytes`;
//! then `"routes " + decimal byte length + "\n" + bytes` of the route map
//! file, or `"routes none\n"` when there is none. OPA mode has no policy
//! files here: its hash covers the route map only.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use super::PolicyEngine;
use super::embedded::EmbeddedPolicy;
use crate::config::RoutesFile;
use crate::ext_authz::routes::RouteMap;
use crate::metrics::Metrics;

/// How often the files are re-read for a change of content.
pub const POLL_INTERVAL: Duration = Duration::from_secs(1);

/// The crate version and git commit, as in `casf_build_info`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
pub const COMMIT: &str = env!("CASF_BUILD_COMMIT");

/// An input every policy must evaluate (to any verdict) before it serves.
fn smoke_input() -> Value {
    json!({
        "tool": "cliniccloud.list_appointments",
        "mode": "ALLOW",
        "role": "doctor",
        "subject": {"patient_id": "smoke"},
        "args": {},
        "context": {"tenant_id": "smoke"},
    })
}

/// One policy and route map, checked together, and the hash naming them.
pub struct PolicySet {
    pub engine: Arc<dyn PolicyEngine>,
    pub routes: Arc<RouteMap>,
    /// Lower-case hex SHA-256 (see the module documentation).
    pub hash: String,
    /// `{hash, version, commit}`, the audit payload's `policy`.
    stamp: Value,
}

impl PolicySet {
    pub fn new(engine: Arc<dyn PolicyEngine>, routes: Arc<RouteMap>, hash: String) -> Self {
        let stamp = json!({"hash": hash, "version": VERSION, "commit": COMMIT});
        PolicySet {
            engine,
            routes,
            hash,
            stamp,
        }
    }

    /// A set that is never reloaded, hashed as if it had no files (tests
    /// and embedders that hand the pipeline an engine).
    pub fn fixed(engine: Arc<dyn PolicyEngine>, routes: RouteMap) -> Self {
        Self::new(engine, Arc::new(routes), Sources::default().hash())
    }

    /// The audit payload's `policy` object.
    pub fn stamp(&self) -> &Value {
        &self.stamp
    }
}

/// The bytes a policy set is built from, read once so that what is hashed
/// is exactly what is compiled.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Sources {
    /// `(file name, content)` of each `*.rego`, sorted by name.
    pub policies: Vec<(String, String)>,
    /// The route map file's text, if there is one.
    pub routes: Option<String>,
}

impl Sources {
    pub fn hash(&self) -> String {
        let mut hasher = Sha256::new();
        for (name, text) in &self.policies {
            hasher.update(format!("policy {name}\n{}\n", text.len()).as_bytes());
            hasher.update(text.as_bytes());
        }
        match &self.routes {
            Some(text) => {
                hasher.update(format!("routes {}\n", text.len()).as_bytes());
                hasher.update(text.as_bytes());
            }
            None => hasher.update(b"routes none\n"),
        }
        hex::encode(hasher.finalize())
    }
}

/// Where a policy set comes from.
#[derive(Debug, Clone)]
pub struct SetSource {
    /// `CASF_POLICY_DIR`; `None` in OPA mode (the policy lives in OPA).
    pub policy_dir: Option<PathBuf>,
    pub routes: RoutesFile,
}

impl SetSource {
    /// Reads every file the set is built from.
    pub fn read(&self) -> Result<Sources, String> {
        let policies = match &self.policy_dir {
            Some(dir) => read_policy_dir(dir)?,
            None => Vec::new(),
        };
        let routes = match std::fs::read_to_string(&self.routes.path) {
            Ok(text) => Some(text),
            // Only the default path may be missing (as at startup).
            Err(_) if !self.routes.explicit && !self.routes.path.exists() => None,
            Err(error) => {
                return Err(format!(
                    "cannot read route map {}: {error}",
                    crate::config::shown_path(&self.routes.path)
                ));
            }
        };
        Ok(Sources { policies, routes })
    }

    /// Builds and checks a set from `sources`. `opa` is the OPA engine,
    /// reused as is; without it the Rego files are compiled here.
    pub fn build(
        &self,
        sources: &Sources,
        opa: Option<&Arc<dyn PolicyEngine>>,
    ) -> Result<PolicySet, String> {
        let routes = match &sources.routes {
            Some(text) => RouteMap::parse(text).map_err(|reason| {
                format!(
                    "route map {}: {reason}",
                    crate::config::shown_path(&self.routes.path)
                )
            })?,
            None => RouteMap::empty(),
        };
        let engine: Arc<dyn PolicyEngine> = match (opa, &self.policy_dir) {
            (Some(opa), _) => opa.clone(),
            (None, dir) => {
                let origin = dir
                    .as_deref()
                    .map_or_else(|| "<no policy dir>".to_owned(), |d| d.display().to_string());
                let policy = EmbeddedPolicy::from_named_sources(&origin, sources.policies.clone())
                    .map_err(|e| e.to_string())?;
                let failed: Vec<String> = policy
                    .run_tests()
                    .into_iter()
                    .filter(|test| !test.passed)
                    .map(|test| match test.error {
                        Some(error) => format!("{} ({error})", test.name),
                        None => test.name,
                    })
                    .collect();
                if !failed.is_empty() {
                    return Err(format!(
                        "Rego tests failed in {origin}: {}",
                        failed.join(", ")
                    ));
                }
                policy
                    .evaluate_sync(&smoke_input())
                    .map_err(|e| format!("smoke input does not evaluate: {e}"))?;
                Arc::new(policy)
            }
        };
        Ok(PolicySet::new(engine, Arc::new(routes), sources.hash()))
    }
}

fn read_policy_dir(dir: &Path) -> Result<Vec<(String, String)>, String> {
    let shown = crate::config::shown_path(dir);
    let entries =
        std::fs::read_dir(dir).map_err(|e| format!("cannot read policy directory {shown}: {e}"))?;
    let mut files = Vec::new();
    for entry in entries {
        let path = entry
            .map_err(|e| format!("cannot read policy directory {shown}: {e}"))?
            .path();
        if path.extension().is_some_and(|ext| ext == "rego") && path.is_file() {
            files.push(path);
        }
    }
    files.sort();
    files
        .into_iter()
        .map(|path| {
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            std::fs::read_to_string(&path)
                .map(|text| (name, text))
                .map_err(|e| format!("cannot read policy file {}: {e}", path.display()))
        })
        .collect()
}

/// What one reload attempt did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reload {
    /// The files hash as the live set (or as the last refused one).
    Unchanged,
    /// A new set serves, with this hash.
    Swapped(String),
    /// The new files were refused; the old set keeps serving.
    Refused(String),
}

/// The live set's engine, for `/healthz` probes.
pub struct LiveEngine(pub Arc<LivePolicy>);

#[async_trait::async_trait]
impl PolicyEngine for LiveEngine {
    fn backend(&self) -> &'static str {
        self.0.current().engine.backend()
    }

    async fn evaluate(&self, input: &Value) -> Result<super::PolicyVerdict, super::PolicyError> {
        let set = self.0.current();
        set.engine.evaluate(input).await
    }
}

/// The policy set in force, and how to rebuild it.
pub struct LivePolicy {
    current: ArcSwap<PolicySet>,
    /// `None` for a fixed set, never reloaded.
    source: Option<SetSource>,
    /// The OPA engine, reused across route map reloads.
    opa: Option<Arc<dyn PolicyEngine>>,
    /// Hash of the last refused files, so a broken file is refused (and
    /// logged) once, not every poll.
    refused: std::sync::Mutex<Option<String>>,
    /// Reloads run one at a time (SIGHUP and the poll may coincide).
    reloading: tokio::sync::Mutex<()>,
}

impl LivePolicy {
    /// A set that is never reloaded.
    pub fn fixed(set: PolicySet) -> Self {
        LivePolicy {
            current: ArcSwap::from_pointee(set),
            source: None,
            opa: None,
            refused: std::sync::Mutex::new(None),
            reloading: tokio::sync::Mutex::new(()),
        }
    }

    /// Builds the first set from `source`; errors refuse to start.
    pub fn load(source: SetSource, opa: Option<Arc<dyn PolicyEngine>>) -> Result<Self, String> {
        let sources = source.read()?;
        let set = source.build(&sources, opa.as_ref())?;
        Ok(LivePolicy {
            current: ArcSwap::from_pointee(set),
            source: Some(source),
            opa,
            refused: std::sync::Mutex::new(None),
            reloading: tokio::sync::Mutex::new(()),
        })
    }

    /// The set in force now; a decision keeps it to its end.
    pub fn current(&self) -> Arc<PolicySet> {
        self.current.load_full()
    }

    /// Re-reads the files and, if their hash changed (or `force`, on
    /// SIGHUP), builds, checks and swaps in the new set. Counted in
    /// `casf_policy_reload_total` unless unchanged.
    pub async fn reload(&self, force: bool, metrics: &Metrics) -> Reload {
        let Some(source) = &self.source else {
            return Reload::Unchanged;
        };
        let _one_at_a_time = self.reloading.lock().await;
        let read = {
            let source = source.clone();
            tokio::task::spawn_blocking(move || source.read()).await
        };
        let sources = match read {
            Ok(Ok(sources)) => sources,
            Ok(Err(reason)) => return self.refuse(None, reason, metrics),
            Err(error) => return self.refuse(None, error.to_string(), metrics),
        };
        let hash = sources.hash();
        let refused_before = self
            .refused
            .lock()
            .map(|r| r.as_deref() == Some(hash.as_str()))
            .unwrap_or(false);
        if !force && (hash == self.current().hash || refused_before) {
            return Reload::Unchanged;
        }
        // Compiling and running the Rego tests is CPU work: off the
        // request threads.
        let built = {
            let source = source.clone();
            let opa = self.opa.clone();
            tokio::task::spawn_blocking(move || source.build(&sources, opa.as_ref())).await
        };
        match built {
            Ok(Ok(set)) => {
                let previous = self.current.swap(Arc::new(set));
                if let Ok(mut refused) = self.refused.lock() {
                    *refused = None;
                }
                let live = self.current();
                metrics.policy_reloaded(true);
                metrics.policy_live(Some(&previous.hash), &live.hash);
                metrics.shadow_routes(live.routes.shadowed_routes());
                tracing::warn!(from = %previous.hash, to = %live.hash, routes = live.routes.len(), "policy reloaded");
                if live.routes.shadowed_routes() > 0 {
                    tracing::warn!(
                        routes = live.routes.shadowed_routes(),
                        "shadow: routes with enforce: false are answered ALLOW whatever the decision"
                    );
                }
                Reload::Swapped(live.hash.clone())
            }
            Ok(Err(reason)) => self.refuse(Some(hash), reason, metrics),
            Err(error) => self.refuse(Some(hash), error.to_string(), metrics),
        }
    }

    fn refuse(&self, hash: Option<String>, reason: String, metrics: &Metrics) -> Reload {
        metrics.policy_reloaded(false);
        tracing::error!(
            %reason,
            live = %self.current().hash,
            "policy reload refused: the old policy keeps serving"
        );
        if let (Some(hash), Ok(mut refused)) = (hash, self.refused.lock()) {
            *refused = Some(hash);
        }
        Reload::Refused(reason)
    }
}

/// `SIGHUP`, caught from the moment this is called (before the ready line),
/// so that a reload request never meets the default action (terminate).
#[cfg(unix)]
pub type Hangup = Option<tokio::signal::unix::Signal>;
#[cfg(not(unix))]
pub type Hangup = ();

#[cfg(unix)]
pub fn catch_hangup() -> Hangup {
    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok()
}

#[cfg(not(unix))]
pub fn catch_hangup() -> Hangup {}

/// Reloads `live` on `SIGHUP` and when its files change, until `stop`.
pub async fn follow(
    live: Arc<LivePolicy>,
    metrics: Arc<Metrics>,
    #[cfg_attr(not(unix), allow(unused_variables, unused_mut))] mut hangup: Hangup,
    stop: impl Future<Output = ()>,
) {
    {
        if live.source.is_none() {
            return;
        }
        let mut stop = std::pin::pin!(stop);
        let mut ticker = tokio::time::interval(POLL_INTERVAL);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            #[cfg(unix)]
            let signalled = async {
                match hangup.as_mut() {
                    Some(signal) => signal.recv().await.is_some(),
                    None => std::future::pending().await,
                }
            };
            #[cfg(not(unix))]
            let signalled = std::future::pending::<bool>();
            let force = tokio::select! {
                _ = &mut stop => return,
                _ = ticker.tick() => false,
                true = signalled => {
                    tracing::info!("SIGHUP: reloading policy and route map");
                    true
                }
            };
            live.reload(force, &metrics).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hash_follows_the_documented_formula() {
        let sources = Sources {
            policies: vec![
                ("a.rego".into(), "package casf\n".into()),
                ("b.rego".into(), "x".into()),
            ],
            routes: Some("routes: []\n".into()),
        };
        let mut expected = Sha256::new();
        expected
            .update(b"policy a.rego\n13\npackage casf\npolicy b.rego\n1\nxroutes 11\nroutes: []\n");
        assert_eq!(sources.hash(), hex::encode(expected.finalize()));
        let none = Sources::default();
        assert_eq!(
            none.hash(),
            hex::encode(Sha256::digest(b"routes none\n")),
            "no files, no route map"
        );
        let mut moved = sources.clone();
        moved.policies[0].1.push(' ');
        assert_ne!(moved.hash(), sources.hash());
    }
}
