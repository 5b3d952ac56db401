//! Load generator for casf-verifier: closed-loop (max throughput) or
//! open-loop at a fixed rate, with latency measured from each request's
//! *intended* start so a stalled server cannot hide its queueing
//! (no coordinated omission). Loopback targets only; every run is bounded
//! by `--duration` and `--requests`.
//!
//! ```text
//! cargo run --release --example loadgen -- --door http --url http://127.0.0.1:8000 \
//!     --scenario mix --connections 32 --duration 10
//! cargo run --release --example loadgen -- --rate 1000 --duration 10 --pid $(pgrep casf-verifier)
//! ```

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};
use hdrhistogram::Histogram;
use serde_json::{Value, json};
use tokio::sync::Mutex;

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Door {
    /// `POST /verify`.
    Http,
}

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
enum Scenario {
    /// `list_appointments` in ALLOW mode.
    ReadAllow,
    /// `create_appointment` in ALLOW mode, unique patient each time.
    WriteAllow,
    /// `generate_invoice` in READ_ONLY mode.
    Deny,
    /// Reads, writes, denials, replays and SMS (some to the same patient).
    Mix,
}

#[derive(Debug, Parser)]
#[command(about = "Bounded load against a casf-verifier on this machine")]
struct Args {
    #[arg(long, value_enum, default_value = "http")]
    door: Door,
    /// Base URL of the verifier (loopback only).
    #[arg(long, default_value = "http://127.0.0.1:8000")]
    url: String,
    #[arg(long, value_enum, default_value = "mix")]
    scenario: Scenario,
    /// Concurrent connections (closed loop) or the in-flight cap (open loop).
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
    /// The verifier's pid, to report its peak RSS (VmHWM).
    #[arg(long)]
    pid: Option<u32>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

/// Makes request bodies; unique ids and patients so that neither the
/// anti-replay gate nor the SMS limit short-circuits the work, except where
/// the mix asks for replays and bursts on purpose.
struct Workload {
    scenario: Scenario,
    run: String,
    next: AtomicU64,
}

impl Workload {
    fn body(&self) -> Value {
        self.body_for(self.next.fetch_add(1, Ordering::Relaxed))
    }

    /// The `n`th request of the run, the same every time it is asked for.
    fn body_for(&self, n: u64) -> Value {
        let id = |k: u64| format!("{}-{k}", self.run);
        let call = |tool: &str, mode: &str, request_id: String, patient: String| {
            json!({
                "request_id": request_id,
                "tool": tool,
                "mode": mode,
                "role": "receptionist",
                "subject": {"patient_id": patient},
                "args": {"slot": "2026-12-01T09:00", "duration_min": 30},
                "context": {"tenant_id": "clinic-a"}
            })
        };
        let scenario = match self.scenario {
            Scenario::Mix => match n % 20 {
                0..=9 => Scenario::ReadAllow,
                10..=14 => Scenario::WriteAllow,
                15..=16 => Scenario::Deny,
                // A replay of an earlier write: same id, same payload.
                17 => return self.body_for(n - 7),
                // SMS: every other one goes to an already-messaged patient.
                _ => {
                    return call(
                        "twilio.send_sms",
                        "ALLOW",
                        id(n),
                        format!("p-sms-{}", n / 2),
                    );
                }
            },
            other => other,
        };
        match scenario {
            Scenario::ReadAllow => call(
                "cliniccloud.list_appointments",
                "ALLOW",
                id(n),
                format!("p-{n}"),
            ),
            Scenario::WriteAllow => call(
                "cliniccloud.create_appointment",
                "ALLOW",
                id(n),
                format!("p-{n}"),
            ),
            _ => call(
                "stripe.generate_invoice",
                "READ_ONLY",
                id(n),
                format!("p-{n}"),
            ),
        }
    }
}

#[derive(Default)]
struct Tally {
    sent: AtomicU64,
    errors: AtomicU64,
    non_2xx: AtomicU64,
    allow: AtomicU64,
    deny: AtomicU64,
}

struct Recorder {
    latencies: Mutex<Histogram<u64>>,
    tally: Tally,
    record_after: Instant,
}

impl Recorder {
    async fn record(&self, intended: Instant, outcome: Result<(u16, Option<String>), String>) {
        match outcome {
            Ok((status, decision)) => {
                if !(200..300).contains(&status) {
                    self.tally.non_2xx.fetch_add(1, Ordering::Relaxed);
                }
                match decision.as_deref() {
                    Some("ALLOW") => self.tally.allow.fetch_add(1, Ordering::Relaxed),
                    _ => self.tally.deny.fetch_add(1, Ordering::Relaxed),
                };
            }
            Err(_) => {
                self.tally.errors.fetch_add(1, Ordering::Relaxed);
            }
        }
        if intended >= self.record_after {
            let micros = intended.elapsed().as_micros().min(u128::from(u64::MAX)) as u64;
            let mut histogram = self.latencies.lock().await;
            // Values beyond the histogram's range are clamped rather than lost.
            histogram.saturating_record(micros.max(1));
        }
    }
}

async fn call(
    client: &reqwest::Client,
    url: &str,
    body: &Value,
) -> Result<(u16, Option<String>), String> {
    let response = client
        .post(url)
        .json(body)
        .send()
        .await
        .map_err(|e| e.to_string())?;
    let status = response.status().as_u16();
    let decision: Value = response.json().await.map_err(|e| e.to_string())?;
    Ok((status, decision["decision"].as_str().map(str::to_owned)))
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

fn peak_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

#[tokio::main]
async fn main() -> Result<(), String> {
    let args = Args::parse();
    ensure_loopback(&args.url)?;
    let Door::Http = args.door;
    let url = format!("{}/verify", args.url.trim_end_matches('/'));
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(args.connections)
        .tcp_nodelay(true)
        .build()
        .map_err(|e| e.to_string())?;
    let workload = Arc::new(Workload {
        scenario: args.scenario,
        run: uuid::Uuid::new_v4().to_string(),
        next: AtomicU64::new(0),
    });
    let started = Instant::now();
    let recorder = Arc::new(Recorder {
        latencies: Mutex::new(
            Histogram::new_with_bounds(1, 60_000_000, 3).map_err(|e| e.to_string())?,
        ),
        tally: Tally::default(),
        record_after: started + Duration::from_secs_f64(args.warmup),
    });
    let deadline = started + Duration::from_secs_f64(args.warmup + args.duration);

    match args.rate {
        None => {
            let workers = (0..args.connections).map(|_| {
                let (client, url, workload, recorder) = (
                    client.clone(),
                    url.clone(),
                    workload.clone(),
                    recorder.clone(),
                );
                let limit = args.requests;
                tokio::spawn(async move {
                    while Instant::now() < deadline
                        && recorder.tally.sent.fetch_add(1, Ordering::Relaxed) < limit
                    {
                        let body = workload.body();
                        let intended = Instant::now();
                        let outcome = call(&client, &url, &body).await;
                        recorder.record(intended, outcome).await;
                    }
                })
            });
            for worker in workers.collect::<Vec<_>>() {
                worker.await.map_err(|e| e.to_string())?;
            }
        }
        Some(rate) => {
            let in_flight = Arc::new(tokio::sync::Semaphore::new(args.connections.max(1) * 64));
            let interval = Duration::from_secs_f64(1.0 / rate.max(1) as f64);
            let mut tasks = tokio::task::JoinSet::new();
            let mut n: u64 = 0;
            loop {
                // Each request has its slot on a fixed schedule; latency counts from that slot.
                let intended = started + interval.mul_f64(n as f64);
                if intended >= deadline || n >= args.requests {
                    break;
                }
                tokio::time::sleep_until(intended.into()).await;
                let permit = in_flight
                    .clone()
                    .acquire_owned()
                    .await
                    .map_err(|e| e.to_string())?;
                let (client, url, workload, recorder) = (
                    client.clone(),
                    url.clone(),
                    workload.clone(),
                    recorder.clone(),
                );
                recorder.tally.sent.fetch_add(1, Ordering::Relaxed);
                tasks.spawn(async move {
                    let body = workload.body();
                    let outcome = call(&client, &url, &body).await;
                    recorder.record(intended, outcome).await;
                    drop(permit);
                });
                n += 1;
                while tasks.try_join_next().is_some() {}
            }
            while tasks.join_next().await.is_some() {}
        }
    }

    let elapsed = started.elapsed().as_secs_f64() - args.warmup;
    let histogram = recorder.latencies.lock().await;
    let tally = &recorder.tally;
    let ms = |q: f64| histogram.value_at_quantile(q) as f64 / 1000.0;
    let report = json!({
        "door": format!("{:?}", args.door).to_lowercase(),
        "scenario": format!("{:?}", args.scenario),
        "mode": if let Some(rate) = args.rate { format!("open loop {rate}/s") } else { format!("closed loop, {} connections", args.connections) },
        "recorded": histogram.len(),
        "throughput_rps": (histogram.len() as f64 / elapsed.max(1e-9)).round(),
        "p50_ms": ms(0.50), "p90_ms": ms(0.90), "p99_ms": ms(0.99), "p999_ms": ms(0.999),
        "max_ms": histogram.max() as f64 / 1000.0,
        "errors": tally.errors.load(Ordering::Relaxed),
        "non_2xx": tally.non_2xx.load(Ordering::Relaxed),
        "allow": tally.allow.load(Ordering::Relaxed),
        "deny": tally.deny.load(Ordering::Relaxed),
        "verifier_peak_rss_mib": args.pid.and_then(peak_rss_kib).map(|kib| (kib as f64 / 1024.0 * 10.0).round() / 10.0),
    });
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
