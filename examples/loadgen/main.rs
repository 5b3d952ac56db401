//! Load generator for casf-verifier: closed-loop (max throughput) or
//! open-loop at a fixed rate, with latency measured from each request's
//! *intended* start so a stalled server cannot hide its queueing
//! (no coordinated omission). Loopback targets only; every run is bounded
//! by `--duration` and `--requests`.
//!
//! Three doors carry the same tool calls ([`workload`]):
//! - `http`: `POST /verify` on the verifier's HTTP listener;
//! - `grpc`: `Authorization/Check` on its gRPC listener, each Check built as
//!   Envoy builds it for the tool call (the verifier's route map must trust
//!   the identity headers `x-casf-role` and `x-casf-tenant-id`);
//! - `envoy`: the tool call itself (`POST /cliniccloud/patients/…`) to an
//!   Envoy listener; an ALLOW is the upstream's 2xx, a DENY Envoy's 403.
//!
//! ```text
//! cargo run --release --example loadgen -- --door http --url http://127.0.0.1:8000 \
//!     --scenario mix --connections 32 --duration 10
//! cargo run --release --example loadgen -- --door http --url https://localhost:8443 \
//!     --ca ca.pem --client-cert client.pem --client-key client.key
//! cargo run --release --example loadgen -- --door grpc --url http://127.0.0.1:9191 --rate 1000
//! cargo run --release --example loadgen -- --door envoy --url http://127.0.0.1:10000 --rate 1000
//! ```

mod doors;
mod verifier_proc;
mod workload;

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};
use hdrhistogram::Histogram;
use serde_json::json;
use tokio::sync::Mutex;

use doors::{DoorClient, Reply, Verdict};
use workload::{Scenario, Workload};

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Door {
    /// `POST /verify` on the verifier's HTTP listener.
    Http,
    /// ext_authz `Check` on the verifier's gRPC listener.
    Grpc,
    /// The tool call itself, through an Envoy listener.
    Envoy,
}

impl Door {
    fn default_url(self) -> &'static str {
        match self {
            Door::Http => "http://127.0.0.1:8000",
            Door::Grpc => "http://127.0.0.1:9191",
            Door::Envoy => "http://127.0.0.1:10000",
        }
    }
}

#[derive(Debug, Parser)]
#[command(about = "Bounded load against a casf-verifier on this machine")]
struct Args {
    #[arg(long, value_enum, default_value = "http")]
    door: Door,
    /// Base URL of the door (loopback only). Defaults: http :8000, grpc
    /// :9191, envoy :10000 on 127.0.0.1.
    #[arg(long)]
    url: Option<String>,
    #[arg(long, value_enum, default_value = "mix")]
    scenario: Scenario,
    /// Concurrent requests (closed loop) or the in-flight cap / 64 (open loop).
    #[arg(long, default_value_t = 16)]
    connections: usize,
    /// Fixed arrival rate in requests/s (open loop); omit for closed loop.
    #[arg(long)]
    rate: Option<u64>,
    /// Seconds to run.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Seconds of warm-up whose latencies are not recorded.
    #[arg(long, default_value_t = 1.0)]
    warmup: f64,
    /// Hard cap on requests sent.
    #[arg(long, default_value_t = 2_000_000)]
    requests: u64,
    /// The verifier's pid, to report its peak RSS (VmHWM) and its CPU time
    /// per recorded request.
    #[arg(long)]
    pid: Option<u32>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
    /// PEM CA that signs the verifier's certificate, for an `https://` URL
    /// (the HTTP door with CASF_TLS_CERT).
    #[arg(long)]
    ca: Option<std::path::PathBuf>,
    /// PEM client certificate and key, for a door with CASF_TLS_CLIENT_CA.
    #[arg(long, requires = "client_key")]
    client_cert: Option<std::path::PathBuf>,
    #[arg(long, requires = "client_cert")]
    client_key: Option<std::path::PathBuf>,
    /// Write every recorded request as a CSV line `start_ms,latency_ms`
    /// (start counted from the end of the warm-up), to see when a tail
    /// happened, e.g. against a checkpoint's time.
    #[arg(long)]
    timeline: Option<std::path::PathBuf>,
}

#[derive(Default)]
struct Tally {
    sent: AtomicU64,
    /// No response at all (connection refused, reset, gRPC error status).
    errors: AtomicU64,
    /// Responses whose HTTP status was not 2xx, denials through Envoy included.
    non_2xx: AtomicU64,
    allow: AtomicU64,
    deny: AtomicU64,
    /// Responses that were neither an allow nor a decision to deny.
    undecided: AtomicU64,
    /// The slowest request of the whole run, warm-up included: when nothing
    /// was recorded, it says whether the requests were slow or never sent.
    slowest_us: AtomicU64,
}

struct Recorder {
    latencies: Mutex<Histogram<u64>>,
    /// Open loop: how late each request started against its slot (the
    /// generator's own precision; already included in `latencies`).
    lag: std::sync::Mutex<Histogram<u64>>,
    tally: Tally,
    record_after: Instant,
    /// The first error or undecided response, to say what went wrong.
    first_problem: std::sync::Mutex<Option<String>>,
    /// `--timeline`: (start after the warm-up, latency), in µs.
    timeline: Option<std::sync::Mutex<Vec<(u64, u64)>>>,
}

impl Recorder {
    fn note_lag(&self, intended: Instant) {
        if intended >= self.record_after
            && let Ok(mut lag) = self.lag.lock()
        {
            lag.saturating_record((intended.elapsed().as_micros() as u64).max(1));
        }
    }

    fn note_problem(&self, problem: String) {
        if let Ok(mut first) = self.first_problem.lock() {
            first.get_or_insert(problem);
        }
    }

    async fn record(&self, intended: Instant, outcome: Result<Reply, String>) {
        let tally = &self.tally;
        match outcome {
            Ok(reply) => {
                if !(200..300).contains(&reply.status) {
                    tally.non_2xx.fetch_add(1, Ordering::Relaxed);
                }
                let counter = match reply.verdict {
                    Verdict::Allow => &tally.allow,
                    Verdict::Deny => &tally.deny,
                    Verdict::Undecided => &tally.undecided,
                };
                counter.fetch_add(1, Ordering::Relaxed);
                if let Some(detail) = reply.detail {
                    self.note_problem(detail);
                }
            }
            Err(error) => {
                tally.errors.fetch_add(1, Ordering::Relaxed);
                self.note_problem(error);
            }
        }
        let micros = intended.elapsed().as_micros().min(u128::from(u64::MAX)) as u64;
        tally.slowest_us.fetch_max(micros, Ordering::Relaxed);
        if intended >= self.record_after {
            let mut histogram = self.latencies.lock().await;
            // Values beyond the histogram's range are clamped rather than lost.
            histogram.saturating_record(micros.max(1));
            if let Some(timeline) = &self.timeline
                && let Ok(mut timeline) = timeline.lock()
            {
                let start = intended.duration_since(self.record_after).as_micros() as u64;
                timeline.push((start, micros));
            }
        }
    }
}

/// The open loop's schedule: request `n` is due at `started + n * interval`.
///
/// It runs on a thread of its own and sleeps with the OS's high-resolution
/// timer. Tokio's timer wheel has millisecond granularity and rounds every
/// deadline up, so pacing with `sleep_until` sent each request up to a
/// millisecond after its slot, and that lag (counted from the slot, as it
/// must be) was charged to the server. `schedule_lag` in the report shows
/// what is left of it.
struct Pacer {
    interval: Duration,
    started: Instant,
    deadline: Instant,
    limit: u64,
}

impl Pacer {
    fn run<T>(&self, mut fire: impl FnMut(Instant) -> T) -> Vec<T> {
        let mut fired = Vec::new();
        for n in 0..self.limit {
            let intended = self.started + self.interval.mul_f64(n as f64);
            if intended >= self.deadline {
                break;
            }
            let now = Instant::now();
            if intended > now {
                std::thread::sleep(intended - now);
            }
            fired.push(fire(intended));
        }
        fired
    }
}

fn ensure_loopback(url: &str) -> Result<(), String> {
    let host = url
        .split("://")
        .nth(1)
        .and_then(|rest| rest.split(['/', ':']).next())
        .ok_or_else(|| format!("cannot read a host from {url}"))?;
    let loopback = host == "localhost" || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback());
    if loopback {
        Ok(())
    } else {
        Err(format!(
            "{host} is not a loopback address; load is only sent to this machine"
        ))
    }
}

#[tokio::main]
async fn main() -> Result<(), String> {
    let args = Args::parse();
    let url = args
        .url
        .clone()
        .unwrap_or_else(|| args.door.default_url().to_owned());
    ensure_loopback(&url)?;
    let door = match args.door {
        Door::Http => {
            let tls = url
                .starts_with("https://")
                .then(|| casf_verifier::tls::ClientTls {
                    ca: args.ca.clone(),
                    cert: args.client_cert.clone(),
                    key: args.client_key.clone(),
                });
            DoorClient::http(&url, args.connections, tls.as_ref())?
        }
        Door::Grpc => DoorClient::grpc(&url).await?,
        Door::Envoy => DoorClient::envoy(&url, args.connections)?,
    };
    let workload = Arc::new(Workload::new(args.scenario));
    let started = Instant::now();
    let recorder = Arc::new(Recorder {
        latencies: Mutex::new(
            Histogram::new_with_bounds(1, 60_000_000, 3).map_err(|e| e.to_string())?,
        ),
        tally: Tally::default(),
        lag: std::sync::Mutex::new(
            Histogram::new_with_bounds(1, 60_000_000, 3).map_err(|e| e.to_string())?,
        ),
        record_after: started + Duration::from_secs_f64(args.warmup),
        first_problem: std::sync::Mutex::new(None),
        timeline: args
            .timeline
            .as_ref()
            .map(|_| std::sync::Mutex::new(Vec::new())),
    });
    let deadline = started + Duration::from_secs_f64(args.warmup + args.duration);
    // The verifier's CPU time when recording starts, after the warmup.
    let cpu_at_start = args.pid.map(|pid| {
        let record_after = recorder.record_after;
        tokio::spawn(async move {
            tokio::time::sleep_until(record_after.into()).await;
            verifier_proc::cpu_time(pid)
        })
    });

    match args.rate {
        None => {
            let workers = (0..args.connections).map(|_| {
                let (door, workload, recorder) = (door.clone(), workload.clone(), recorder.clone());
                let limit = args.requests;
                tokio::spawn(async move {
                    while Instant::now() < deadline
                        && recorder.tally.sent.fetch_add(1, Ordering::Relaxed) < limit
                    {
                        let call = workload.next_call();
                        let intended = Instant::now();
                        let outcome = door.send(&call).await;
                        recorder.record(intended, outcome).await;
                    }
                })
            });
            for worker in workers.collect::<Vec<_>>() {
                worker.await.map_err(|e| e.to_string())?;
            }
        }
        Some(rate) => {
            let pacer = Pacer {
                interval: Duration::from_secs_f64(1.0 / rate.max(1) as f64),
                started,
                deadline,
                limit: args.requests,
            };
            let in_flight = Arc::new(tokio::sync::Semaphore::new(args.connections.max(1) * 64));
            let runtime = tokio::runtime::Handle::current();
            let (door, workload, recorder) = (door.clone(), workload.clone(), recorder.clone());
            let tasks = tokio::task::spawn_blocking(move || {
                pacer.run(|intended| {
                    let (door, workload, recorder) =
                        (door.clone(), workload.clone(), recorder.clone());
                    let in_flight = in_flight.clone();
                    recorder.tally.sent.fetch_add(1, Ordering::Relaxed);
                    runtime.spawn(async move {
                        // Waiting for room counts as latency: `intended` is fixed.
                        let Ok(_permit) = in_flight.acquire_owned().await else {
                            return;
                        };
                        recorder.note_lag(intended);
                        let call = workload.next_call();
                        let outcome = door.send(&call).await;
                        recorder.record(intended, outcome).await;
                    })
                })
            })
            .await
            .map_err(|e| e.to_string())?;
            for task in tasks {
                task.await.map_err(|e| e.to_string())?;
            }
        }
    }

    let elapsed = started.elapsed().as_secs_f64() - args.warmup;
    // The timeline's zero on CLOCK_MONOTONIC (what `Instant` and
    // `perf record -k CLOCK_MONOTONIC` count), to line a tail up with a profile.
    let timeline_origin_monotonic_s = args.timeline.as_ref().map(|_| {
        let mut now = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: clock_gettime writes the timespec it is given, nothing else.
        unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
        now.tv_sec as f64 + now.tv_nsec as f64 / 1e9 - recorder.record_after.elapsed().as_secs_f64()
    });
    let cpu_spent = match (args.pid, cpu_at_start) {
        (Some(pid), Some(at_start)) => {
            let at_start = at_start.await.map_err(|e| e.to_string())?;
            at_start
                .zip(verifier_proc::cpu_time(pid))
                .map(|(start, end)| end.saturating_sub(start))
        }
        _ => None,
    };
    let histogram = recorder.latencies.lock().await;
    let tally = &recorder.tally;
    let ms = |q: f64| histogram.value_at_quantile(q) as f64 / 1000.0;
    let count = |c: &AtomicU64| c.load(Ordering::Relaxed);
    let lag_ms = |q: f64| {
        recorder
            .lag
            .lock()
            .ok()
            .filter(|lag| !lag.is_empty())
            .map(|lag| lag.value_at_quantile(q) as f64 / 1000.0)
    };
    let first_problem = recorder
        .first_problem
        .lock()
        .map(|p| p.clone())
        .unwrap_or_default();
    let report = json!({
        "door": format!("{:?}", args.door).to_lowercase(),
        "url": url,
        "scenario": format!("{:?}", args.scenario),
        "mode": if let Some(rate) = args.rate { format!("open loop {rate}/s") } else { format!("closed loop, {} connections", args.connections) },
        "recorded": histogram.len(),
        "throughput_rps": (histogram.len() as f64 / elapsed.max(1e-9)).round(),
        "p50_ms": ms(0.50), "p90_ms": ms(0.90), "p99_ms": ms(0.99), "p999_ms": ms(0.999),
        "max_ms": histogram.max() as f64 / 1000.0,
        "schedule_lag_p50_ms": lag_ms(0.50), "schedule_lag_p99_ms": lag_ms(0.99),
        "errors": count(&tally.errors),
        "non_2xx": count(&tally.non_2xx),
        "allow": count(&tally.allow),
        "deny": count(&tally.deny),
        "undecided": count(&tally.undecided),
        "slowest_overall_ms": count(&tally.slowest_us) as f64 / 1000.0,
        "first_problem": first_problem,
        "timeline_origin_monotonic_s": timeline_origin_monotonic_s,
        "verifier_peak_rss_mib": args.pid.and_then(verifier_proc::peak_rss_kib).map(|kib| (kib as f64 / 1024.0 * 10.0).round() / 10.0),
        // Includes requests sent in the window but recorded after it: a
        // slight overestimate at most, and the same for every row.
        "verifier_cpu_us_per_request": cpu_spent.filter(|_| !histogram.is_empty()).map(|cpu| (cpu.as_secs_f64() * 1e6 / histogram.len() as f64 * 10.0).round() / 10.0),
    });
    if let (Some(path), Some(timeline)) = (&args.timeline, &recorder.timeline) {
        let mut timeline = timeline.lock().map_err(|e| e.to_string())?.clone();
        timeline.sort_unstable();
        let csv: String = timeline
            .iter()
            .map(|(start, latency)| {
                format!("{:.3},{:.3}\n", *start as f64 / 1e3, *latency as f64 / 1e3)
            })
            .collect();
        std::fs::write(path, format!("start_ms,latency_ms\n{csv}"))
            .map_err(|e| format!("{}: {e}", path.display()))?;
    }
    if args.json {
        println!("{report}");
    } else {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).map_err(|e| e.to_string())?
        );
    }
    Ok(())
}
