//! Circuit breakers, one per (integration, URL), kept by the deliverer that
//! owns the integration's shard (like its token bucket).
//!
//! A handler that keeps failing is not hammered: after `circuit_failures`
//! consecutive failed attempts (timeout, refused or reset connection, 5xx,
//! 429) its circuit opens, and its jobs wait on the delay ladder, uncharged,
//! until the next probe time. Then one job at a time is let through as a
//! probe (half-open): a success closes the circuit and the waiting jobs flow
//! again, through the integration's rate limit; a failure opens it again for
//! twice as long (with jitter), up to five minutes.
//!
//! The state is in memory only. A shard handed over to another replica (or a
//! restarted deliverer) starts with every circuit closed, so at most
//! `circuit_failures` more attempts reach a failing handler before its
//! circuit opens again: the cost of keeping no datastore.
//!
//! Everything here is pure: the caller passes the time, so the state machine
//! is tested without a clock.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use swallow_shared::job::retry::RetrySchedule;

/// The first probe comes this long after a circuit opens.
pub const FIRST_PROBE: Duration = Duration::from_secs(5);
/// Probe intervals double up to this.
pub const MAX_PROBE: Duration = Duration::from_secs(300);
/// A circuit that no job has asked about, and no attempt reported on, for
/// this long is forgotten (its integration has no traffic, or the URL left
/// the configuration), so that an idle circuit does not stay open, and
/// alerting, for ever. Twice the longest step of the delay ladder: a job
/// waiting behind an open circuit asks again at least that often.
pub const IDLE_FORGET: Duration = Duration::from_secs(15 * 60);
/// A probe whose result never came (its task was aborted) is given up this
/// long after its timeout, and another probe may go.
const LOST_PROBE_MARGIN: Duration = Duration::from_secs(1);

/// What an attempt says about the handler's health.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The handler answered (2xx, or a 4xx other than 429: it is up, the
    /// request was the problem).
    Answered,
    /// A timeout, a refused or reset connection, a 5xx or a 429.
    Failed,
    /// Nothing about the handler (a refused destination: no request went).
    Unknown,
}

impl Verdict {
    /// Classifies an attempt by its HTTP status, or its failure class when
    /// there was no status (`timeout`, `connect`, `error`, `blocked`).
    pub fn of(status: Option<u16>, class: &str) -> Verdict {
        match status {
            Some(429) | Some(500..=599) => Verdict::Failed,
            Some(_) => Verdict::Answered,
            None if class == "blocked" => Verdict::Unknown,
            None => Verdict::Failed,
        }
    }
}

/// The states, as the `to` label of `swallow_circuit_transitions_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CircuitState {
    Closed,
    Open,
    HalfOpen,
}

impl CircuitState {
    pub const ALL: [CircuitState; 3] = [CircuitState::Open, CircuitState::HalfOpen, CircuitState::Closed];

    pub fn label(self) -> &'static str {
        match self {
            CircuitState::Closed => "closed",
            CircuitState::Open => "open",
            CircuitState::HalfOpen => "half_open",
        }
    }
}

/// A change of state, for the metric and the log line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transition {
    pub to: CircuitState,
    /// The last real error (the one that opened it, or kept it open).
    pub last_error: String,
}

/// Whether a job may be attempted now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    /// The circuit is closed (or off): attempt.
    Go,
    /// Attempt as the circuit's one probe; report its health with `record`.
    Probe,
    /// Not now: wait on the ladder until `until_ms` (a probe time, or the end
    /// of a probe under way), uncharged.
    Wait { until_ms: u64, last_error: String },
}

#[derive(Debug, Clone)]
enum State {
    Closed {
        failures: u32,
    },
    Open {
        next_probe_ms: u64,
        /// How many times in a row it has opened (1 for the first).
        openings: u32,
    },
    HalfOpen {
        probe_deadline_ms: u64,
        openings: u32,
    },
}

#[derive(Debug, Clone)]
struct Circuit {
    state: State,
    last_error: String,
    /// When a job last asked about it or an attempt last reported on it.
    touched_ms: u64,
}

/// The circuits of one deliverer, keyed by integration id, then URL (so
/// that a job's look-up borrows its strings instead of building a key).
#[derive(Debug, Default)]
pub struct Circuits {
    map: Mutex<HashMap<String, HashMap<String, Circuit>>>,
}

/// How many circuits in `map` are not closed.
fn count_open(map: &HashMap<String, HashMap<String, Circuit>>) -> usize {
    map.values()
        .flat_map(HashMap::values)
        .filter(|c| !matches!(c.state, State::Closed { .. }))
        .count()
}

impl Circuits {
    pub fn new() -> Self {
        Circuits::default()
    }

    /// May a job for `key` be attempted at `now_ms`? `threshold` is the
    /// integration's `circuit_failures` (0: breaker off); `probe_timeout` the
    /// integration's per-attempt timeout, after which a probe whose result
    /// never came is given up.
    pub fn admit(
        &self,
        key: (&str, &str),
        threshold: u32,
        probe_timeout: Duration,
        now_ms: u64,
    ) -> (Admission, Option<Transition>) {
        if threshold == 0 {
            return (Admission::Go, None);
        }
        let mut map = self.map.lock().expect("circuits lock");
        let Some(circuit) = map.get_mut(key.0).and_then(|urls| urls.get_mut(key.1)) else {
            return (Admission::Go, None);
        };
        circuit.touched_ms = now_ms;
        let probe_until = now_ms + (probe_timeout + LOST_PROBE_MARGIN).as_millis() as u64;
        match circuit.state {
            State::Closed { .. } => (Admission::Go, None),
            State::Open {
                next_probe_ms,
                openings,
            } => {
                if now_ms < next_probe_ms {
                    // Back once the probe's result is in, so that a waiting
                    // job makes one trip on the ladder per probe, not two
                    // (the probe itself is the first job due after
                    // `next_probe_ms`).
                    return (
                        Admission::Wait {
                            until_ms: next_probe_ms + (probe_timeout + LOST_PROBE_MARGIN).as_millis() as u64,
                            last_error: circuit.last_error.clone(),
                        },
                        None,
                    );
                }
                circuit.state = State::HalfOpen {
                    probe_deadline_ms: probe_until,
                    openings,
                };
                let transition = Transition {
                    to: CircuitState::HalfOpen,
                    last_error: circuit.last_error.clone(),
                };
                (Admission::Probe, Some(transition))
            }
            State::HalfOpen {
                probe_deadline_ms,
                openings,
                ..
            } => {
                if now_ms < probe_deadline_ms {
                    return (
                        Admission::Wait {
                            until_ms: probe_deadline_ms,
                            last_error: circuit.last_error.clone(),
                        },
                        None,
                    );
                }
                // The probe's result never came (its task was aborted): probe again.
                circuit.state = State::HalfOpen {
                    probe_deadline_ms: probe_until,
                    openings,
                };
                (Admission::Probe, None)
            }
        }
    }

    /// Records what an attempt for `key` said about its handler. `jitter` is
    /// a draw in `[0, 1)`: a re-opened circuit's next probe is between three
    /// quarters of and the full doubled interval.
    pub fn record(
        &self,
        key: (&str, &str),
        threshold: u32,
        verdict: Verdict,
        error: &str,
        now_ms: u64,
        jitter: f64,
    ) -> Option<Transition> {
        if threshold == 0 || verdict == Verdict::Unknown {
            return None;
        }
        let mut map = self.map.lock().expect("circuits lock");
        if verdict == Verdict::Answered {
            let urls = map.get_mut(key.0)?;
            let was = urls.remove(key.1)?;
            if urls.is_empty() {
                map.remove(key.0);
            }
            return match was.state {
                State::Closed { .. } => None,
                State::Open { .. } | State::HalfOpen { .. } => Some(Transition {
                    to: CircuitState::Closed,
                    last_error: was.last_error,
                }),
            };
        }
        let urls = map.entry(key.0.to_owned()).or_default();
        let circuit = urls.entry(key.1.to_owned()).or_insert(Circuit {
            state: State::Closed { failures: 0 },
            last_error: String::new(),
            touched_ms: now_ms,
        });
        circuit.last_error = error.to_owned();
        circuit.touched_ms = now_ms;
        let openings = match circuit.state {
            State::Closed { failures } if failures + 1 < threshold => {
                circuit.state = State::Closed { failures: failures + 1 };
                return None;
            }
            State::Closed { .. } => 1,
            // A failure reported while open comes from an attempt that
            // started before the circuit opened: it changes nothing.
            State::Open { .. } => return None,
            State::HalfOpen { openings, .. } => openings + 1,
        };
        circuit.state = State::Open {
            next_probe_ms: now_ms + probe_interval(openings, jitter).as_millis() as u64,
            openings,
        };
        Some(Transition {
            to: CircuitState::Open,
            last_error: circuit.last_error.clone(),
        })
    }

    /// Whether `key`'s circuit is open or half-open now.
    pub fn is_open(&self, key: (&str, &str)) -> bool {
        let map = self.map.lock().expect("circuits lock");
        map.get(key.0)
            .and_then(|urls| urls.get(key.1))
            .is_some_and(|c| !matches!(c.state, State::Closed { .. }))
    }

    /// How many circuits are not closed (open or half-open) now.
    pub fn open(&self) -> usize {
        count_open(&self.map.lock().expect("circuits lock"))
    }

    /// Forgets the circuits of integrations for which `keep` is false (a
    /// shard given up, an integration removed), and says how many open ones
    /// went.
    pub fn retain(&self, mut keep: impl FnMut(&str) -> bool) -> usize {
        let mut map = self.map.lock().expect("circuits lock");
        let open_before = count_open(&map);
        map.retain(|integration, _| keep(integration));
        open_before - count_open(&map)
    }

    /// Forgets the circuits untouched for [`IDLE_FORGET`] at `now_ms`, and
    /// returns the (integration, URL) of the open or half-open ones among
    /// them.
    pub fn forget_idle(&self, now_ms: u64) -> Vec<(String, String)> {
        let idle_ms = IDLE_FORGET.as_millis() as u64;
        let mut open = Vec::new();
        self.map.lock().expect("circuits lock").retain(|integration, urls| {
            urls.retain(|url, c| {
                let keep = now_ms.saturating_sub(c.touched_ms) < idle_ms;
                if !keep && !matches!(c.state, State::Closed { .. }) {
                    open.push((integration.clone(), url.clone()));
                }
                keep
            });
            !urls.is_empty()
        });
        open
    }
}

/// The wait before the probe after the circuit's `openings`-th opening in a
/// row: 5 s, then doubling with jitter (three quarters to the full ceiling)
/// up to five minutes.
pub fn probe_interval(openings: u32, jitter: f64) -> Duration {
    if openings <= 1 {
        return FIRST_PROBE;
    }
    let ceiling = RetrySchedule {
        first: FIRST_PROBE,
        cap: MAX_PROBE,
    }
    .ceiling(openings);
    ceiling.mul_f64(0.75 + 0.25 * jitter.clamp(0.0, 1.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: (&str, &str) = ("googlebot", "http://127.0.0.1:9/hook");
    const T: Duration = Duration::from_secs(1);

    fn fail(c: &Circuits, now: u64) -> Option<Transition> {
        c.record(KEY, 3, Verdict::Failed, "HTTP 500", now, 0.0)
    }

    #[test]
    fn which_failures_count() {
        assert_eq!(Verdict::of(Some(500), "5xx"), Verdict::Failed);
        assert_eq!(Verdict::of(Some(503), "5xx"), Verdict::Failed);
        assert_eq!(Verdict::of(Some(429), "4xx"), Verdict::Failed);
        assert_eq!(Verdict::of(None, "timeout"), Verdict::Failed);
        assert_eq!(Verdict::of(None, "connect"), Verdict::Failed);
        assert_eq!(Verdict::of(None, "error"), Verdict::Failed);
        assert_eq!(Verdict::of(Some(404), "4xx"), Verdict::Answered);
        assert_eq!(Verdict::of(Some(410), "4xx"), Verdict::Answered);
        assert_eq!(Verdict::of(Some(200), "2xx"), Verdict::Answered);
        assert_eq!(Verdict::of(None, "blocked"), Verdict::Unknown);
    }

    #[test]
    fn opens_after_the_threshold_of_consecutive_failures() {
        let c = Circuits::new();
        assert_eq!(fail(&c, 0), None);
        assert_eq!(fail(&c, 1), None);
        assert_eq!(c.open(), 0);
        assert_eq!(c.admit(KEY, 3, T, 2).0, Admission::Go);
        let opened = fail(&c, 2).expect("the third failure opens it");
        assert_eq!(opened.to, CircuitState::Open);
        assert_eq!(opened.last_error, "HTTP 500");
        assert_eq!(c.open(), 1);
        assert!(c.is_open(KEY));
        assert_eq!(
            c.admit(KEY, 3, T, 3).0,
            Admission::Wait {
                until_ms: 2 + 5_000 + 2_000,
                last_error: "HTTP 500".into()
            }
        );
    }

    #[test]
    fn an_answer_resets_the_count_and_other_4xx_do_not_count() {
        let c = Circuits::new();
        fail(&c, 0);
        fail(&c, 1);
        assert_eq!(c.record(KEY, 3, Verdict::Answered, "", 2, 0.0), None);
        fail(&c, 3);
        fail(&c, 4);
        assert_eq!(c.open(), 0, "two failures after an answer are not three in a row");
        assert_eq!(c.record(KEY, 3, Verdict::Unknown, "blocked", 5, 0.0), None);
        assert!(fail(&c, 6).is_some(), "a blocked attempt neither counts nor resets");
    }

    #[test]
    fn zero_turns_the_breaker_off() {
        let c = Circuits::new();
        for now in 0..100 {
            assert_eq!(c.record(KEY, 0, Verdict::Failed, "HTTP 500", now, 0.0), None);
            assert_eq!(c.admit(KEY, 0, T, now).0, Admission::Go);
        }
        assert_eq!(c.open(), 0);
    }

    #[test]
    fn one_probe_at_a_time_then_close_on_success() {
        let c = Circuits::new();
        for now in 0..3 {
            fail(&c, now);
        }
        let probe_at = 2 + 5_000;
        let (admission, transition) = c.admit(KEY, 3, T, probe_at);
        assert_eq!(admission, Admission::Probe);
        assert_eq!(transition.unwrap().to, CircuitState::HalfOpen);
        // Others wait for the probe's result, at most its timeout.
        match c.admit(KEY, 3, T, probe_at + 10).0 {
            Admission::Wait { until_ms, .. } => assert_eq!(until_ms, probe_at + 2_000),
            other => panic!("a second job went while the probe was under way: {other:?}"),
        }
        let closed = c.record(KEY, 3, Verdict::Answered, "", probe_at + 50, 0.0).unwrap();
        assert_eq!(closed.to, CircuitState::Closed);
        assert_eq!(c.open(), 0);
        assert_eq!(c.admit(KEY, 3, T, probe_at + 60).0, Admission::Go);
        // Closed again means counting from zero.
        fail(&c, probe_at + 70);
        fail(&c, probe_at + 71);
        assert_eq!(c.open(), 0);
    }

    #[test]
    fn failed_probes_double_the_wait_up_to_five_minutes() {
        let c = Circuits::new();
        for now in 0..3 {
            fail(&c, now);
        }
        let mut now = 2;
        let mut waits = Vec::new();
        for _ in 0..10 {
            let Admission::Wait { until_ms, .. } = c.admit(KEY, 3, T, now).0 else {
                panic!("open circuit let a job through");
            };
            waits.push((until_ms - now - 2_000) / 1000); // the probe, then its timeout and margin
            now = until_ms;
            assert_eq!(c.admit(KEY, 3, T, now).0, Admission::Probe);
            let again = c.record(KEY, 3, Verdict::Failed, "timeout", now + 1, 0.999);
            assert_eq!(again.unwrap().to, CircuitState::Open);
            now += 1;
        }
        assert_eq!(waits, [5, 9, 19, 39, 79, 159, 299, 299, 299, 299]);
        assert_eq!(
            probe_interval(2, 0.0),
            Duration::from_millis(7_500),
            "jitter takes at most a quarter"
        );
    }

    #[test]
    fn a_lost_probe_is_replaced_after_its_timeout() {
        let c = Circuits::new();
        for now in 0..3 {
            fail(&c, now);
        }
        assert_eq!(c.admit(KEY, 3, T, 5_002).0, Admission::Probe);
        assert!(matches!(c.admit(KEY, 3, T, 6_000).0, Admission::Wait { .. }));
        assert_eq!(c.admit(KEY, 3, T, 7_002).0, Admission::Probe);
    }

    #[test]
    fn circuits_are_per_url_and_forgotten_with_their_integration() {
        let c = Circuits::new();
        for now in 0..3 {
            fail(&c, now);
        }
        assert_eq!(
            c.admit(("googlebot", "http://127.0.0.1:9/other"), 3, T, 4).0,
            Admission::Go
        );
        assert_eq!(c.admit(("otherbot", KEY.1), 3, T, 4).0, Admission::Go);
        assert_eq!(c.retain(|id| id != "googlebot"), 1);
        assert_eq!(c.open(), 0);
        assert_eq!(c.admit(KEY, 3, T, 4).0, Admission::Go);
    }

    #[test]
    fn an_idle_circuit_is_forgotten_and_one_in_use_is_kept() {
        let c = Circuits::new();
        let idle = IDLE_FORGET.as_millis() as u64;
        for now in 0..3 {
            fail(&c, now);
        }
        assert_eq!(c.open(), 1);
        let other = ("other", "http://127.0.0.1:9/other");
        c.record(other, 3, Verdict::Failed, "HTTP 500", 10, 0.0);
        // A job asking about the open circuit keeps it (it goes as the probe).
        assert_eq!(c.admit(KEY, 3, T, idle - 1).0, Admission::Probe);
        assert_eq!(c.forget_idle(idle + 10), Vec::<(String, String)>::new());
        assert_eq!(c.open(), 1, "the circuit in use stays open");
        // The closed one, untouched since 10, went quietly: two more
        // failures do not open it, where they would have with its first.
        for now in [idle + 11, idle + 12] {
            c.record(other, 3, Verdict::Failed, "HTTP 500", now, 0.0);
        }
        assert!(!c.is_open(other), "the idle closed circuit was forgotten");
        assert_eq!(
            c.forget_idle(2 * idle),
            vec![(KEY.0.to_owned(), KEY.1.to_owned())],
            "the open circuit untouched for IDLE_FORGET is forgotten"
        );
        assert_eq!(c.open(), 0);
        assert_eq!(c.admit(KEY, 3, T, 2 * idle).0, Admission::Go);
    }
}
