//! How long this machine's CPUs stop running a ready thread, with nothing
//! of ours to blame: one thread pinned to each CPU spins on the monotonic
//! clock and records every gap between two consecutive readings longer
//! than `--threshold-ms`.
//!
//! Why it exists: on the 2-core VMs the benchmarks run on, a request's p99
//! moved from 2 to 32 ms between identical runs, and the slow requests came
//! in clusters about a second apart. A spinner alone, on an idle machine,
//! showed the same: one CPU stopped for 5-7 ms about every 1.08 s, with no
//! guest thread sampled on it meanwhile (the host ran something else), and
//! the guest reports no steal time. A latency target below that floor
//! cannot be judged here, so `scripts/bench.sh --interleave` measures the
//! floor in the same run as the targets. A gap includes the guest kernel's
//! own work on that CPU (interrupts, kernel threads); run it with the
//! machine otherwise idle to see the host's share.
//!
//!   cargo run --release --example hiccup -- --seconds 10 --json

use std::time::{Duration, Instant};

use clap::Parser;
use serde_json::json;

#[derive(Debug, Parser)]
#[command(about = "Per-CPU stalls of a spinning thread (host preemption, guest kernel work)")]
struct Args {
    /// Seconds to spin on every CPU.
    #[arg(long, default_value_t = 10.0)]
    seconds: f64,
    /// Gaps shorter than this are not stalls (a timer interrupt is ~10 µs).
    #[arg(long, default_value_t = 1.0)]
    threshold_ms: f64,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

/// What one CPU's spinner saw.
struct CpuStalls {
    cpu: usize,
    /// (when, from the start; how long), one per stall.
    stalls: Vec<(Duration, Duration)>,
    pinned: bool,
}

fn spin(cpu: usize, run_for: Duration, threshold: Duration) -> CpuStalls {
    // SAFETY: a zeroed cpu_set_t is the empty set; CPU_SET and
    // sched_setaffinity only read and write the set given.
    let pinned = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) == 0
    };
    let started = Instant::now();
    let mut last = started;
    let mut stalls = Vec::new();
    loop {
        let now = Instant::now();
        let gap = now - last;
        if gap > threshold {
            stalls.push((last - started, gap));
        }
        if now - started >= run_for {
            break;
        }
        last = now;
    }
    CpuStalls {
        cpu,
        stalls,
        pinned,
    }
}

fn main() -> Result<(), String> {
    let args = Args::parse();
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .map_err(|e| e.to_string())?;
    let run_for = Duration::from_secs_f64(args.seconds);
    let threshold = Duration::from_secs_f64(args.threshold_ms / 1000.0);
    let spinners: Vec<_> = (0..cpus)
        .map(|cpu| std::thread::spawn(move || spin(cpu, run_for, threshold)))
        .collect();
    let mut per_cpu = Vec::new();
    for spinner in spinners {
        per_cpu.push(
            spinner
                .join()
                .map_err(|_| "a spinner panicked".to_owned())?,
        );
    }

    let ms = |d: Duration| (d.as_secs_f64() * 1e6).round() / 1e3;
    let report: Vec<_> = per_cpu
        .iter()
        .map(|c| {
            let total: Duration = c.stalls.iter().map(|(_, gap)| *gap).sum();
            let at_least = |limit_ms: f64| {
                c.stalls
                    .iter()
                    .filter(|(_, gap)| gap.as_secs_f64() * 1e3 >= limit_ms)
                    .count()
            };
            // How regular the long ones are: the median time between stalls
            // of 4 ms or more.
            let long: Vec<Duration> = c
                .stalls
                .iter()
                .filter(|(_, gap)| gap.as_secs_f64() * 1e3 >= 4.0)
                .map(|(at, _)| *at)
                .collect();
            let mut intervals: Vec<Duration> = long.windows(2).map(|w| w[1] - w[0]).collect();
            intervals.sort_unstable();
            json!({
                "cpu": c.cpu,
                "pinned": c.pinned,
                "stalls": c.stalls.len(),
                "stalls_ge_2ms": at_least(2.0),
                "stalls_ge_5ms": at_least(5.0),
                "max_ms": c.stalls.iter().map(|(_, gap)| *gap).max().map(ms).unwrap_or(0.0),
                "stalled_ms": ms(total),
                "stalled_percent": (total.as_secs_f64() / args.seconds * 1e4).round() / 1e2,
                "median_ms_between_stalls_ge_4ms": intervals.get(intervals.len() / 2).copied().map(ms),
            })
        })
        .collect();
    let report = json!({
        "seconds": args.seconds,
        "threshold_ms": args.threshold_ms,
        "cpus": report,
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
