//! The operator's mode floor: a mode no caller can lower.
//!
//! The caller names a mode in every request (the body's `mode`, or the
//! route map's mode header on the Envoy door), so without a floor a
//! compromised agent could always claim `ALLOW`. The floor is the operator's:
//! each decision runs under the stricter of the two, in the order
//! ALLOW < STEP_UP < READ_ONLY < KILL_SWITCH. The floor itself is the
//! stricter of three sources: `CASF_MODE_FLOOR` (fixed), the mode named in
//! `CASF_MODE_FLOOR_FILE` (followed at run time, for GitOps) and the one an
//! operator caller sets with `PUT /admin/mode` (with `CASF_CALLERS`), so an
//! operator can pull the kill switch without a restart, and no source can
//! lower what another raised. The admin source is held in memory only.
//!
//! The floor is read once, atomically, when a decision starts: a decision
//! that starts after a change sees it.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::domain::Mode;
use crate::metrics::Metrics;

/// How often the floor file is read. Well under the 1 s the floor must take
/// to be enforced after a change.
pub const FILE_POLL_INTERVAL: Duration = Duration::from_millis(200);

/// How strict a mode is: a higher rank allows less.
pub fn rank(mode: Mode) -> u8 {
    match mode {
        Mode::Allow => 0,
        Mode::StepUp => 1,
        Mode::ReadOnly => 2,
        Mode::KillSwitch => 3,
    }
}

/// The stricter of two modes.
pub fn stricter(a: Mode, b: Mode) -> Mode {
    if rank(b) > rank(a) { b } else { a }
}

fn from_rank(rank: u8) -> Mode {
    match rank {
        0 => Mode::Allow,
        1 => Mode::StepUp,
        2 => Mode::ReadOnly,
        // The strictest for anything else: a floor never fails open.
        _ => Mode::KillSwitch,
    }
}

/// Where a floor comes from. The floor in force is the stricter of all
/// three, so none of them can lower what another raised.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FloorSource {
    /// `CASF_MODE_FLOOR`, fixed for the life of the process.
    Env,
    /// `CASF_MODE_FLOOR_FILE`, as last read.
    File,
    /// `PUT /admin/mode` by an operator caller; forgotten on restart.
    Admin,
}

/// Each source's mode, and the floor in force.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FloorState {
    pub effective: Mode,
    pub env: Mode,
    /// `None` without `CASF_MODE_FLOOR_FILE`.
    pub file: Option<Mode>,
    pub admin: Mode,
}

/// The current floor, shared by the pipeline and whatever changes it.
#[derive(Debug)]
pub struct ModeFloor {
    /// The floor in force: the one atomic a decision reads.
    rank: AtomicU8,
    /// The sources; changed under this lock so that the floor in force and
    /// `casf_mode_floor` always agree with them.
    sources: Mutex<FloorState>,
}

impl ModeFloor {
    /// A floor of `mode` from `CASF_MODE_FLOOR`.
    pub fn new(mode: Mode) -> Self {
        ModeFloor {
            rank: AtomicU8::new(rank(mode)),
            sources: Mutex::new(FloorState {
                effective: mode,
                env: mode,
                file: None,
                admin: Mode::Allow,
            }),
        }
    }

    pub fn get(&self) -> Mode {
        from_rank(self.rank.load(Ordering::SeqCst))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, FloorState> {
        // The state is a few plain values, whole after any panic.
        self.sources.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Each source's mode and the floor in force.
    pub fn state(&self) -> FloorState {
        *self.lock()
    }

    /// Sets one source's mode and returns the state after it; the floor in
    /// force becomes the stricter of the sources, shown in `metrics`.
    pub fn set(&self, source: FloorSource, mode: Mode, metrics: &Metrics) -> FloorState {
        let mut state = self.lock();
        match source {
            FloorSource::Env => state.env = mode,
            FloorSource::File => state.file = Some(mode),
            FloorSource::Admin => state.admin = mode,
        }
        let effective = stricter(
            stricter(state.env, state.admin),
            state.file.unwrap_or(Mode::Allow),
        );
        state.effective = effective;
        self.rank.store(rank(effective), Ordering::SeqCst);
        metrics.mode_floor(effective);
        *state
    }
}

impl Default for ModeFloor {
    fn default() -> Self {
        ModeFloor::new(Mode::Allow)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum FloorFileError {
    #[error("cannot read {path}: {error}")]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
}

/// The mode a floor file names: its content, trimmed, one wire name.
pub fn read_floor_file(path: &Path) -> Result<Mode, FloorFileError> {
    let text = std::fs::read_to_string(path).map_err(|error| FloorFileError::Read {
        path: path.to_owned(),
        error,
    })?;
    Mode::parse(text.trim()).map_err(|error| FloorFileError::Invalid {
        path: path.to_owned(),
        reason: error.to_string(),
    })
}

/// Follows `path` until `stop` resolves: each change of the mode it names
/// becomes the file's source of the floor (see [`FloorSource`]), logged and
/// shown in `casf_mode_floor`. A file that cannot be read or parsed keeps the
/// floor where it was, with an error logged once per distinct problem, so a
/// botched edit never lowers it.
pub async fn follow_file(
    floor: Arc<ModeFloor>,
    path: PathBuf,
    metrics: Arc<Metrics>,
    stop: impl Future<Output = ()>,
) {
    let mut stop = std::pin::pin!(stop);
    let mut ticker = tokio::time::interval(FILE_POLL_INTERVAL);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_problem: Option<String> = None;
    loop {
        tokio::select! {
            _ = &mut stop => return,
            _ = ticker.tick() => {}
        }
        match read_floor_file(&path) {
            Ok(named) => {
                last_problem = None;
                let before = floor.state();
                if before.file == Some(named) {
                    continue;
                }
                let after = floor.set(FloorSource::File, named, &metrics);
                if after.effective != before.effective {
                    tracing::warn!(from = %before.effective, to = %after.effective, file = %path.display(), "mode floor changed");
                }
            }
            Err(error) => {
                let problem = error.to_string();
                if last_problem.as_deref() != Some(problem.as_str()) {
                    tracing::error!(%problem, floor = %floor.get(), "mode floor file unusable: the floor stays");
                    last_problem = Some(problem);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stricter_mode_wins_in_either_order() {
        for a in Mode::ALL {
            for b in Mode::ALL {
                let s = stricter(*a, *b);
                assert_eq!(s, stricter(*b, *a));
                assert!(rank(s) >= rank(*a) && rank(s) >= rank(*b));
                assert!(s == *a || s == *b);
            }
        }
        assert_eq!(stricter(Mode::Allow, Mode::KillSwitch), Mode::KillSwitch);
        assert_eq!(stricter(Mode::ReadOnly, Mode::StepUp), Mode::ReadOnly);
    }

    #[test]
    fn ranks_round_trip_and_anything_else_is_the_kill_switch() {
        for mode in Mode::ALL {
            assert_eq!(from_rank(rank(*mode)), *mode);
        }
        assert_eq!(from_rank(200), Mode::KillSwitch);
    }

    #[test]
    fn the_floor_is_the_stricter_of_its_sources() {
        let metrics = Metrics::new();
        let floor = ModeFloor::new(Mode::StepUp);
        assert_eq!(floor.get(), Mode::StepUp);
        let state = floor.set(FloorSource::Admin, Mode::KillSwitch, &metrics);
        assert_eq!(state.effective, Mode::KillSwitch);
        assert_eq!(floor.get(), Mode::KillSwitch);
        assert!(
            metrics
                .encode()
                .contains("casf_mode_floor{mode=\"KILL_SWITCH\"} 1")
        );
        // The file cannot lower what the operator raised...
        floor.set(FloorSource::File, Mode::Allow, &metrics);
        assert_eq!(floor.get(), Mode::KillSwitch);
        // ... and the operator's ALLOW goes back to the other sources, never
        // below CASF_MODE_FLOOR.
        let state = floor.set(FloorSource::Admin, Mode::Allow, &metrics);
        assert_eq!(
            state,
            FloorState {
                effective: Mode::StepUp,
                env: Mode::StepUp,
                file: Some(Mode::Allow),
                admin: Mode::Allow
            }
        );
        floor.set(FloorSource::File, Mode::ReadOnly, &metrics);
        assert_eq!(floor.get(), Mode::ReadOnly);
        assert!(
            metrics
                .encode()
                .contains("casf_mode_floor{mode=\"READ_ONLY\"} 1")
        );
    }

    #[tokio::test]
    async fn a_floor_file_is_followed_and_a_bad_edit_keeps_the_floor() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("floor");
        std::fs::write(&path, "READ_ONLY\n").unwrap();
        let floor = Arc::new(ModeFloor::default());
        let metrics = Arc::new(Metrics::new());
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let follower = tokio::spawn(follow_file(
            floor.clone(),
            path.clone(),
            metrics.clone(),
            async move {
                let _ = stop_rx.await;
            },
        ));
        let until = |mode: Mode| {
            let floor = floor.clone();
            async move {
                tokio::time::timeout(Duration::from_secs(10), async {
                    while floor.get() != mode {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                })
                .await
                .unwrap_or_else(|_| panic!("the floor never became {mode}"))
            }
        };
        until(Mode::ReadOnly).await;
        std::fs::write(&path, "KILL_SWITCH").unwrap();
        until(Mode::KillSwitch).await;
        assert!(
            metrics
                .encode()
                .contains("casf_mode_floor{mode=\"KILL_SWITCH\"} 1")
        );
        // A typo, then a missing file: the kill switch stays.
        std::fs::write(&path, "ALOW").unwrap();
        tokio::time::sleep(FILE_POLL_INTERVAL * 3).await;
        assert_eq!(floor.get(), Mode::KillSwitch);
        std::fs::remove_file(&path).unwrap();
        tokio::time::sleep(FILE_POLL_INTERVAL * 3).await;
        assert_eq!(floor.get(), Mode::KillSwitch);
        let _ = stop_tx.send(());
        follower.await.unwrap();
    }
}
