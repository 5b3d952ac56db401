//! What the load generator reads of the verifier process (`--pid`) from
//! `/proc`: its peak RSS, and the CPU time it spent during the measured
//! window. CPU per request repeats far better than requests/s on a shared,
//! noisy machine, so it is the steadier figure for before/after comparisons.

use std::time::Duration;

/// Linux reports `utime`/`stime` in USER_HZ ticks, fixed at 100 per second
/// in its user-space ABI.
const TICK: Duration = Duration::from_millis(10);

/// Peak resident set size (`VmHWM`) in KiB.
pub fn peak_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// User plus system CPU time the process has used so far, all threads.
pub fn cpu_time(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    cpu_time_of_stat(&stat)
}

fn cpu_time_of_stat(stat: &str) -> Option<Duration> {
    // The command name is parenthesised and may hold spaces or ')', so
    // fields are counted from the last ')': `state` (field 3) comes first,
    // `utime` and `stime` (fields 14 and 15) are the 12th and 13th.
    let mut fields = stat.rsplit_once(')')?.1.split_whitespace().skip(11);
    let utime: u32 = fields.next()?.parse().ok()?;
    let stime: u32 = fields.next()?.parse().ok()?;
    Some(TICK * (utime + stime))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_time_is_utime_plus_stime_whatever_the_command_name() {
        let stat = "4242 (casf (x) verifier) S 1 4242 4242 0 -1 4194560 1000 0 0 0 \
                    250 75 0 0 20 0 5 0 100 1000000 2000 18446744073709551615";
        assert_eq!(cpu_time_of_stat(stat), Some(Duration::from_millis(3250)));
        assert_eq!(cpu_time_of_stat("4242 (cut short) S 1"), None);
    }

    #[test]
    fn this_process_cpu_time_grows_while_it_computes() {
        let pid = std::process::id();
        let before = cpu_time(pid).expect("own /proc/PID/stat");
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        let mut burn = 0u64;
        while cpu_time(pid).expect("again") <= before {
            assert!(std::time::Instant::now() < deadline, "no CPU time counted");
            burn = (0..100_000u64).fold(burn, |a, b| a ^ b.wrapping_mul(31));
        }
        assert!(peak_rss_kib(pid).expect("own VmHWM") > 0, "{burn}");
    }
}
