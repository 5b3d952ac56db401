//! Redis state (`REDIS_URL`): anti-replay claims and the SMS limit shared by
//! every verifier process, with the same semantics as [`super::memory`].
//!
//! Each gate is one round trip: an atomic Lua script (EVALSHA, falling back
//! to EVAL after a Redis restart emptied the script cache) or one plain
//! command. One multiplexed connection serves the whole process. Commands
//! never wait for a reconnect: while Redis is down they fail at once, and
//! every operation has a hard 200 ms budget (guide §6), so a request is never
//! held up by Redis for longer than that. While the client knows the
//! connection is lost (it is reconnecting), operations are not even queued:
//! fred's router sits in its reconnect backoff, so a queued command would
//! wait out the whole budget. They fail at once with [`StateError::Down`];
//! a Redis that is merely slow keeps its connection and its 200 ms budget. The client reconnects by itself, so
//! recovery needs no restart, and the process starts even when Redis is down
//! at boot (`/healthz` is 503 and writes fail closed until it is back).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use fred::prelude::{
    Builder, Client, ClientLike, Config, Error as RedisError, ErrorKind, Expiration, KeysInterface,
    LuaInterface, Options, ReconnectPolicy, SetOptions, Value,
};
use fred::types::ClientState;
use fred::types::config::{ServerConfig, TlsConfig, TlsConnector};
use serde::{Deserialize, Serialize};
use sha1::{Digest, Sha1};

use super::{Claim, Persistence, RateLimiter, ReplayGuard, StateError};
use crate::domain::{RequestId, VerifyResponse};
use crate::tls::{ClientTls, ProbeError};

/// Budget of one state operation, retries and script reloads included (guide §6).
pub const COMMAND_TIMEOUT: Duration = Duration::from_millis(200);
/// How long startup waits for a first connection before serving without one.
const BOOT_CONNECT_WAIT: Duration = Duration::from_secs(2);
/// Budget for opening a TCP connection and the AUTH/SELECT that follow it.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// The TLS probe's budget when a health check finds Redis unavailable.
const HEALTH_PROBE_TIMEOUT: Duration = Duration::from_secs(1);
/// A connection with a command unanswered this long is dropped and reopened
/// (a half-open TCP connection would otherwise time out every command forever).
const UNRESPONSIVE_AFTER: Duration = Duration::from_secs(2);
/// Reconnect backoff bounds, in milliseconds; attempts never stop.
const RECONNECT_MIN_DELAY_MS: u32 = 50;
const RECONNECT_MAX_DELAY_MS: u32 = 1_000;

/// Prefix of anti-replay keys; `DEL casf:req:<request_id>` is the guide's
/// runbook for reprocessing a request.
pub const REPLAY_KEY_PREFIX: &str = "casf:req:";

/// Sets a pending claim unless the key exists; otherwise returns what is stored.
/// KEYS[1] claim key; ARGV[1] pending record; ARGV[2] pending TTL in seconds.
const CLAIM_LUA: &str = r"
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'EX', ARGV[2]) then
  return 1
end
return redis.call('GET', KEYS[1])
";

/// Deletes the key only while it holds a pending claim for this fingerprint
/// and, when ARGV[2] is not empty, this owner: a stored decision, or
/// somebody else's claim, is never removed.
/// KEYS[1] claim key; ARGV[1] fingerprint; ARGV[2] owner or ''.
const RELEASE_LUA: &str = r"
local stored = redis.call('GET', KEYS[1])
if not stored then
  return 0
end
local ok, record = pcall(cjson.decode, stored)
if ok and type(record) == 'table' and record.state == 'pending'
    and record.fingerprint == ARGV[1]
    and (ARGV[2] == '' or record.owner == ARGV[2]) then
  return redis.call('DEL', KEYS[1])
end
return 0
";

/// Fixed-window counter: the window starts with the first event. A counter
/// left without a TTL (set by hand) is given one, so it cannot block forever.
/// KEYS[1] counter key; ARGV[1] window in seconds.
const HIT_LUA: &str = r"
local count = redis.call('INCR', KEYS[1])
if count == 1 or redis.call('TTL', KEYS[1]) == -1 then
  redis.call('EXPIRE', KEYS[1], ARGV[1])
end
return count
";

/// A Lua script with its SHA-1, for EVALSHA.
#[derive(Clone)]
struct Script {
    lua: &'static str,
    sha1: String,
}

impl Script {
    fn new(lua: &'static str) -> Self {
        Script {
            lua,
            sha1: hex::encode(Sha1::digest(lua.as_bytes())),
        }
    }
}

/// What `casf:req:<id>` holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "lowercase")]
enum Record {
    Pending {
        fingerprint: String,
        /// Random per claim, so that the cleanup of a claim that timed out
        /// on our side removes that claim only, never a retry's.
        #[serde(default, skip_serializing_if = "String::is_empty")]
        owner: String,
    },
    Done {
        fingerprint: String,
        response: VerifyResponse,
    },
}

impl Record {
    fn pending(fingerprint: &str, owner: &str) -> Result<String, StateError> {
        encode(&Record::Pending {
            fingerprint: fingerprint.to_owned(),
            owner: owner.to_owned(),
        })
    }
}

fn encode(record: &Record) -> Result<String, StateError> {
    serde_json::to_string(record)
        .map_err(|e| StateError::BadResponse(format!("cannot encode replay record: {e}")))
}

/// How an existing record answers a claim with `fingerprint`: a different
/// payload is a mismatch whether or not the first one is still pending.
fn judge(stored: Record, fingerprint: &str) -> Claim {
    match stored {
        Record::Pending {
            fingerprint: stored,
            ..
        } if stored == fingerprint => Claim::Pending,
        Record::Done {
            fingerprint: stored,
            response,
        } if stored == fingerprint => Claim::Cached(response),
        _ => Claim::Mismatch,
    }
}

/// Reads the claim script's reply: 1 for a fresh claim, else the stored record.
fn claim_from_reply(reply: Value, fingerprint: &str) -> Result<Claim, StateError> {
    let stored = match reply {
        Value::Integer(1) => return Ok(Claim::Claimed),
        Value::String(text) => text.to_string(),
        Value::Bytes(bytes) => String::from_utf8(bytes.to_vec())
            .map_err(|_| StateError::BadResponse("replay record is not UTF-8".into()))?,
        other => {
            return Err(StateError::BadResponse(format!(
                "unexpected claim reply of type {:?}",
                other.kind()
            )));
        }
    };
    let record: Record = serde_json::from_str(&stored)
        .map_err(|e| StateError::BadResponse(format!("unreadable replay record: {e}")))?;
    Ok(judge(record, fingerprint))
}

/// Timeouts are their own kind; every other failure means Redis could not
/// be used. fred's messages name no URL or password.
fn state_error(error: RedisError) -> StateError {
    match error.kind() {
        ErrorKind::Timeout => StateError::Timeout,
        ErrorKind::Canceled => StateError::Unavailable("not connected (reconnecting)".into()),
        ErrorKind::Parse | ErrorKind::Protocol => StateError::BadResponse(error.to_string()),
        _ => StateError::Unavailable(error.to_string()),
    }
}

impl TlsProbe {
    /// One handshake of our own, and why it failed if it was refused; `None`
    /// when it succeeded or the server could not be reached (an outage,
    /// which fred's reconnecting already reports). Used at startup, since
    /// fred retries a failed handshake forever, and by the health check.
    async fn handshake_failure(&self, timeout: Duration) -> Option<String> {
        let probe = self.clone();
        let outcome = tokio::task::spawn_blocking(move || {
            crate::tls::probe_handshake(probe.config, &probe.host, probe.port, timeout)
        })
        .await;
        match outcome {
            Ok(Err(ProbeError::Handshake(reason))) => Some(reason),
            Ok(Err(ProbeError::Unreachable(_))) | Ok(Ok(())) | Err(_) => None,
        }
    }
}

fn is_noscript(error: &RedisError) -> bool {
    error.details().starts_with("NOSCRIPT")
}

/// Whole seconds for EX/EXPIRE, never 0 (Redis rejects it).
fn seconds(ttl: Duration) -> i64 {
    i64::try_from(ttl.as_secs().max(1)).unwrap_or(i64::MAX)
}

/// Why the Redis client could not be set up at all (a bad `REDIS_URL`).
#[derive(Debug, thiserror::Error)]
pub enum RedisSetupError {
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsSetupError),
    /// The server's certificate did not verify at startup: a configuration
    /// error (or an impostor), not an outage to wait out.
    #[error("Redis TLS: handshake with the server failed: {0}")]
    Certificate(String),
    #[error("REDIS_URL is not a usable Redis URL: {0}")]
    InvalidUrl(String),
}

impl RedisSetupError {
    pub fn kind(&self) -> &'static str {
        match self {
            RedisSetupError::Tls(_) => "tls",
            RedisSetupError::Certificate(_) => "certificate",
            RedisSetupError::InvalidUrl(_) => "invalid_url",
        }
    }
}

pub struct RedisState {
    client: Client,
    /// Applied to every command: fail at once while disconnected, never
    /// resend (an INCR sent twice would count twice), 200 ms per command.
    options: Options,
    claim: Script,
    release: Script,
    hit: Script,
    replay_ttl: Duration,
    pending_ttl: Duration,
    /// With `rediss://`: what a health check needs to say why a TLS
    /// connection cannot be made (fred only reports "reconnecting").
    tls_probe: Option<TlsProbe>,
}

/// The TLS configuration and the server it was probed against.
#[derive(Clone)]
struct TlsProbe {
    config: Arc<rustls::ClientConfig>,
    host: String,
    port: u16,
}

impl RedisState {
    /// Creates the process's client and starts connecting. Waits up to
    /// [`BOOT_CONNECT_WAIT`] for the first connection, then serves anyway:
    /// the client keeps reconnecting in the background.
    pub async fn connect(
        url: &str,
        tls: &ClientTls,
        replay_ttl: Duration,
        pending_ttl: Duration,
    ) -> Result<Self, RedisSetupError> {
        // The URL parser's messages do not echo the URL, so no secret leaks.
        let mut config =
            Config::from_url(url).map_err(|e| RedisSetupError::InvalidUrl(e.details().into()))?;
        let mut tls_probe = None;
        if config.tls.is_some() {
            // Our roots and client certificate, on the process's one provider,
            // in place of fred's default (system roots only).
            let tls_config = Arc::new(crate::tls::client_config("Redis", tls)?);
            if let ServerConfig::Centralized { server } = &config.server {
                let probe = TlsProbe {
                    config: tls_config.clone(),
                    host: server.host.to_string(),
                    port: server.port,
                };
                if let Some(reason) = probe.handshake_failure(CONNECT_TIMEOUT).await {
                    return Err(RedisSetupError::Certificate(reason));
                }
                tls_probe = Some(probe);
            }
            let connector = TlsConnector::from(Arc::unwrap_or_clone(tls_config));
            config.tls = Some(TlsConfig::from(connector));
        }
        // Unreachable at boot is not fatal: keep trying in the background.
        config.fail_fast = false;
        let client = Builder::from_config(config)
            .with_connection_config(|c| {
                c.connection_timeout = CONNECT_TIMEOUT;
                c.internal_command_timeout = CONNECT_TIMEOUT;
                c.max_command_attempts = 1;
                c.unresponsive.max_timeout = Some(UNRESPONSIVE_AFTER);
                c.unresponsive.interval = UNRESPONSIVE_AFTER / 4;
                c.tcp.nodelay = Some(true);
            })
            .with_performance_config(|p| p.default_command_timeout = COMMAND_TIMEOUT)
            .set_policy(ReconnectPolicy::new_exponential(
                0,
                RECONNECT_MIN_DELAY_MS,
                RECONNECT_MAX_DELAY_MS,
                2,
            ))
            .build()
            .map_err(|e| RedisSetupError::InvalidUrl(e.details().into()))?;
        // The connection task runs for the life of the process.
        drop(client.connect());
        match tokio::time::timeout(BOOT_CONNECT_WAIT, client.wait_for_connect()).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => tracing::warn!(
                error = %state_error(error),
                "Redis unreachable at startup: writes fail closed until it is back"
            ),
            Err(_) => tracing::warn!(
                "Redis not connected within {}s of startup: writes fail closed until it is back",
                BOOT_CONNECT_WAIT.as_secs()
            ),
        }
        Ok(RedisState {
            client,
            options: Options {
                fail_fast: true,
                max_attempts: Some(1),
                timeout: Some(COMMAND_TIMEOUT),
                ..Options::default()
            },
            claim: Script::new(CLAIM_LUA),
            release: Script::new(RELEASE_LUA),
            hit: Script::new(HIT_LUA),
            replay_ttl,
            pending_ttl,
            tls_probe,
        })
    }

    fn key(request_id: &RequestId) -> String {
        format!("{REPLAY_KEY_PREFIX}{}", request_id.as_str())
    }

    /// EVALSHA, or EVAL when Redis no longer has the script cached.
    async fn run(
        &self,
        script: &Script,
        key: String,
        args: Vec<Value>,
    ) -> Result<Value, StateError> {
        run_script(&self.client, &self.options, script, key, args).await
    }

    /// Removes, in the background, a claim whose `SET NX` timed out on our
    /// side: Redis may still execute it later (it was queued behind a slow
    /// command, or Redis was paused), and it would then block every retry of
    /// this `request_id` with `Inv_ReplayConcurrent` for the pending TTL.
    /// The release goes out on the same connection after the claim, so Redis
    /// runs it after the claim whenever that runs; it deletes only a claim
    /// with our owner token.
    fn release_late_claim(&self, key: String, fingerprint: &str, owner: String) {
        let args = vec![Value::from(fingerprint), Value::from(owner)];
        self.release_in_background("releasing a timed-out claim", key, args);
    }

    /// Runs the release script on `key` in the background until Redis
    /// answers (see [`Self::retry_in_background`]).
    fn release_in_background(&self, what: &'static str, key: String, args: Vec<Value>) {
        let (client, options, script) = (
            self.client.clone(),
            self.options.clone(),
            self.release.clone(),
        );
        self.retry_in_background(what, move || {
            let (client, options, script, key, args) = (
                client.clone(),
                options.clone(),
                script.clone(),
                key.clone(),
                args.clone(),
            );
            async move {
                run_script(&client, &options, &script, key, args)
                    .await
                    .map(drop)
            }
        });
    }

    /// Keeps trying, in the background, to finish what a decision left on
    /// its claim (store the decision, or release the claim) after Redis
    /// failed to take it. Without this a write whose decision was audited
    /// while Redis died keeps a pending claim: retries are denied
    /// `Inv_ReplayConcurrent` until it expires, and a retry after that is
    /// decided again, a second ALLOW for one request. Retried with the
    /// reconnect backoff for at most the pending TTL, after which the claim
    /// has expired anyway (so the id is free, and storing over it with `XX`
    /// does nothing). A restart of this process loses the retries: the claim
    /// then expires as before.
    fn retry_in_background<F, Fut>(&self, what: &'static str, mut attempt: F)
    where
        F: FnMut() -> Fut + Send + 'static,
        Fut: Future<Output = Result<(), StateError>> + Send,
    {
        let give_up = tokio::time::Instant::now() + self.pending_ttl;
        tokio::spawn(async move {
            let mut delay = Duration::from_millis(u64::from(RECONNECT_MIN_DELAY_MS));
            loop {
                match attempt().await {
                    Ok(()) => return,
                    Err(error) if tokio::time::Instant::now() + delay < give_up => {
                        tracing::debug!(%error, what, "state store: retrying");
                        tokio::time::sleep(delay).await;
                        delay = (delay * 2)
                            .min(Duration::from_millis(u64::from(RECONNECT_MAX_DELAY_MS)));
                    }
                    Err(error) => {
                        tracing::warn!(%error, what, "state store: gave up; the claim expires with the pending TTL");
                        return;
                    }
                }
            }
        });
    }
}

/// Stores a decision over the claim that holds its key (`SET ... XX`): if
/// the claim is gone (expired, or deleted by an operator) the id is free
/// again and nothing is stored. `Ok(false)` in that case.
async fn store_over_claim(
    client: &Client,
    options: &Options,
    key: String,
    record: String,
    replay_ttl: Duration,
) -> Result<bool, StateError> {
    let with_options = client.with_options(options);
    let stored: Option<String> = bounded(
        client,
        with_options.set(
            key,
            record,
            Some(Expiration::EX(seconds(replay_ttl))),
            Some(SetOptions::XX),
            false,
        ),
    )
    .await?;
    Ok(stored.is_some())
}

/// [`StateError::Down`] unless the client holds a live connection.
fn connected(client: &Client) -> Result<(), StateError> {
    match client.state() {
        ClientState::Connected => Ok(()),
        _ => Err(StateError::Down),
    }
}

/// Runs `operation` within [`COMMAND_TIMEOUT`], whatever it sends; fails at
/// once, sending nothing, while `client` is known to be disconnected.
async fn bounded<T>(
    client: &Client,
    operation: impl Future<Output = Result<T, RedisError>>,
) -> Result<T, StateError> {
    connected(client)?;
    match tokio::time::timeout(COMMAND_TIMEOUT, operation).await {
        Ok(result) => result.map_err(state_error),
        Err(_) => Err(StateError::Timeout),
    }
}

/// EVALSHA, or EVAL when Redis no longer has the script cached (after a
/// restart); EVAL caches it again.
async fn run_script(
    client: &Client,
    options: &Options,
    script: &Script,
    key: String,
    args: Vec<Value>,
) -> Result<Value, StateError> {
    let down = client;
    let client = client.with_options(options);
    bounded(down, async {
        match client
            .evalsha::<Value, _, _, _>(script.sha1.as_str(), key.as_str(), args.clone())
            .await
        {
            Err(error) if is_noscript(&error) => client.eval(script.lua, key.as_str(), args).await,
            other => other,
        }
    })
    .await
}

#[async_trait]
impl ReplayGuard for RedisState {
    fn backend(&self) -> &'static str {
        "redis"
    }

    async fn claim(&self, request_id: &RequestId, fingerprint: &str) -> Result<Claim, StateError> {
        let owner = uuid::Uuid::new_v4().simple().to_string();
        let args = vec![
            Value::from(Record::pending(fingerprint, &owner)?),
            Value::from(seconds(self.pending_ttl)),
        ];
        match self.run(&self.claim, Self::key(request_id), args).await {
            Ok(reply) => claim_from_reply(reply, fingerprint),
            Err(StateError::Timeout) => {
                self.release_late_claim(Self::key(request_id), fingerprint, owner);
                Err(StateError::Timeout)
            }
            Err(error) => Err(error),
        }
    }

    async fn complete(
        &self,
        request_id: &RequestId,
        fingerprint: &str,
        response: &VerifyResponse,
    ) -> Result<(), StateError> {
        let record = encode(&Record::Done {
            fingerprint: fingerprint.to_owned(),
            response: response.clone(),
        })?;
        let key = Self::key(request_id);
        let stored = store_over_claim(
            &self.client,
            &self.options,
            key.clone(),
            record.clone(),
            self.replay_ttl,
        )
        .await;
        match stored {
            Ok(true) => Ok(()),
            Ok(false) => {
                tracing::warn!(request_id = %request_id.as_str(), "claim vanished before the decision was stored; the request_id may be decided again");
                Ok(())
            }
            Err(error) => {
                let (client, options, ttl) =
                    (self.client.clone(), self.options.clone(), self.replay_ttl);
                self.retry_in_background("storing a decision", move || {
                    let (client, options, key, record) =
                        (client.clone(), options.clone(), key.clone(), record.clone());
                    async move {
                        store_over_claim(&client, &options, key, record, ttl)
                            .await
                            .map(drop)
                    }
                });
                Err(error)
            }
        }
    }

    async fn release(&self, request_id: &RequestId, fingerprint: &str) -> Result<(), StateError> {
        // Any owner: only the holder of the claim releases it this way.
        let args = vec![Value::from(fingerprint), Value::from("")];
        let key = Self::key(request_id);
        let released = self.run(&self.release, key.clone(), args.clone()).await;
        if released.is_err() {
            // Left pending, the claim would deny every retry of a fail-closed
            // answer with `Inv_ReplayConcurrent` once Redis is back.
            self.release_in_background("releasing a claim", key, args);
        }
        released.map(drop)
    }

    async fn ping(&self) -> Result<(), StateError> {
        let client = self.client.with_options(&self.options);
        let result = bounded(&self.client, client.ping::<Value>(None))
            .await
            .map(drop);
        if let (
            Err(StateError::Unavailable(_) | StateError::Timeout | StateError::Down),
            Some(probe),
        ) = (&result, &self.tls_probe)
            // Within the health check's own 2 s budget.
            && let Some(reason) = probe.handshake_failure(HEALTH_PROBE_TIMEOUT).await
        {
            return Err(StateError::Unavailable(format!(
                "TLS handshake failed: {reason}"
            )));
        }
        result
    }

    /// `INFO persistence` for AOF, then `CONFIG GET save` for RDB points.
    /// Managed Redis often disables CONFIG: then the answer is unknown.
    async fn persistence(&self) -> Option<Persistence> {
        let client = self.client.with_options(&self.options);
        let info: String = bounded(
            &self.client,
            client.custom(fred::cmd!("INFO"), vec!["persistence"]),
        )
        .await
        .ok()?;
        if aof_enabled(&info) {
            return Some(Persistence::Aof);
        }
        let save: Result<Vec<String>, _> = bounded(
            &self.client,
            client.custom(fred::cmd!("CONFIG"), vec!["GET", "save"]),
        )
        .await;
        Some(match save {
            Ok(pair) => rdb_from_save(&pair),
            Err(_) => Persistence::Unknown,
        })
    }
}

/// `aof_enabled:1` in an `INFO persistence` reply.
fn aof_enabled(info: &str) -> bool {
    info.lines().any(|line| line.trim() == "aof_enabled:1")
}

/// `CONFIG GET save` answers `["save", "<points>"]`; no points, no RDB.
fn rdb_from_save(pair: &[String]) -> Persistence {
    match pair.get(1) {
        Some(points) if !points.trim().is_empty() => Persistence::Rdb,
        _ => Persistence::None,
    }
}

#[async_trait]
impl RateLimiter for RedisState {
    async fn hit(&self, key: &str, window: Duration) -> Result<u64, StateError> {
        let args = vec![Value::from(seconds(window))];
        match self.run(&self.hit, key.to_owned(), args).await? {
            Value::Integer(count) => u64::try_from(count)
                .map_err(|_| StateError::BadResponse(format!("negative counter {count}"))),
            other => Err(StateError::BadResponse(format!(
                "unexpected counter reply of type {:?}",
                other.kind()
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allow() -> VerifyResponse {
        VerifyResponse::from_violations(vec![], vec![])
    }

    fn stored(record: &Record) -> Value {
        Value::from(encode(record).unwrap())
    }

    #[test]
    fn fresh_claim_is_claimed() {
        assert_eq!(
            claim_from_reply(Value::Integer(1), "f").unwrap(),
            Claim::Claimed
        );
    }

    #[test]
    fn stored_records_are_judged_like_the_memory_store() {
        let pending = Record::Pending {
            fingerprint: "f1".into(),
            owner: "o1".into(),
        };
        let done = Record::Done {
            fingerprint: "f1".into(),
            response: allow(),
        };
        assert_eq!(
            claim_from_reply(stored(&pending), "f1").unwrap(),
            Claim::Pending
        );
        // Mismatch wins over pending.
        assert_eq!(
            claim_from_reply(stored(&pending), "f2").unwrap(),
            Claim::Mismatch
        );
        assert_eq!(
            claim_from_reply(stored(&done), "f1").unwrap(),
            Claim::Cached(allow())
        );
        assert_eq!(
            claim_from_reply(stored(&done), "f2").unwrap(),
            Claim::Mismatch
        );
    }

    #[test]
    fn unreadable_records_are_errors_not_claims() {
        for reply in [
            Value::from("not a record"),
            Value::from(r#"{"state":"weird","fingerprint":"f"}"#),
            Value::Null,
            Value::Integer(0),
        ] {
            assert!(
                matches!(
                    claim_from_reply(reply.clone(), "f"),
                    Err(StateError::BadResponse(_))
                ),
                "{reply:?}"
            );
        }
    }

    #[test]
    fn pending_records_carry_their_owner_and_old_ones_still_read() {
        assert_eq!(
            Record::pending("abc", "o1").unwrap(),
            r#"{"state":"pending","fingerprint":"abc","owner":"o1"}"#
        );
        // Written by a version without owners: still a pending claim.
        assert_eq!(
            claim_from_reply(
                Value::from(r#"{"state":"pending","fingerprint":"abc"}"#),
                "abc"
            )
            .unwrap(),
            Claim::Pending
        );
    }

    #[test]
    fn script_hash_is_redis_sha1() {
        // SHA-1 of "return 1", as `SCRIPT LOAD "return 1"` reports it.
        assert_eq!(
            Script::new("return 1").sha1,
            "e0e1f9fabfc9d4800c877a703b823ac0578ff8db"
        );
    }

    #[test]
    fn persistence_is_read_from_info_and_config() {
        assert!(aof_enabled(
            "# Persistence\r\nloading:0\r\naof_enabled:1\r\n"
        ));
        assert!(!aof_enabled("# Persistence\r\naof_enabled:0\r\n"));
        let pair = |points: &str| vec!["save".to_owned(), points.to_owned()];
        assert_eq!(rdb_from_save(&pair("3600 1 300 100")), Persistence::Rdb);
        assert_eq!(rdb_from_save(&pair("")), Persistence::None);
        assert_eq!(rdb_from_save(&[]), Persistence::None);
    }

    #[test]
    fn ttls_are_whole_seconds_and_never_zero() {
        assert_eq!(seconds(Duration::from_millis(10)), 1);
        assert_eq!(seconds(Duration::from_secs(3600)), 3600);
    }

    #[test]
    fn timeouts_and_disconnects_are_told_apart() {
        assert!(matches!(
            state_error(RedisError::new(ErrorKind::Timeout, "t")),
            StateError::Timeout
        ));
        assert!(matches!(
            state_error(RedisError::new(ErrorKind::Canceled, "c")),
            StateError::Unavailable(_)
        ));
        assert!(matches!(
            state_error(RedisError::new(ErrorKind::IO, "refused")),
            StateError::Unavailable(_)
        ));
    }

    #[tokio::test]
    async fn rediss_needs_a_readable_ca_file() {
        crate::tls::install_crypto_provider();
        let tls = ClientTls {
            ca: Some("/nonexistent/redis-ca.pem".into()),
            ..ClientTls::default()
        };
        let refused = RedisState::connect(
            "rediss://:pw@127.0.0.1:6380/0",
            &tls,
            Duration::from_secs(60),
            Duration::from_secs(1),
        )
        .await;
        let Err(error) = refused else {
            panic!("a missing CA file was accepted")
        };
        assert_eq!(error.kind(), "tls");
        assert!(error.to_string().starts_with("Redis TLS:"), "{error}");
        assert!(!error.to_string().contains("pw"), "{error}");
    }
}
