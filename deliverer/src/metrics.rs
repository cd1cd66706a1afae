//! The deliverer's metrics (docs/contract.md §7). Labels are bounded: outcomes,
//! status classes and dead-letter reasons are fixed sets. Each job's visit
//! is counted once, by [`DelivererMetrics::count`], after it was carried out.

use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Registry};
use swallow_shared::job::lifecycle::{DeadReason, ParkReason, Settled};
use swallow_shared::metrics::{counter, counter_vec, gauge, register};

pub const OUTCOMES: [&str; 5] = ["delivered", "retried", "dead", "dropped", "rate_limited"];
pub const CLASSES: [&str; 8] = ["2xx", "3xx", "4xx", "5xx", "timeout", "connect", "error", "blocked"];

#[derive(Clone)]
pub(crate) struct DelivererMetrics {
    pub deliveries: IntCounterVec,
    pub attempts: IntCounterVec,
    pub dead: IntCounterVec,
    pub duration: Histogram,
    pub in_flight: IntGauge,
    pub replies_queued: IntCounter,
    pub deferred: IntCounterVec,
    pub shards_held: IntGauge,
    pub members: IntGauge,
    pub circuits_open: IntGauge,
    pub circuit_transitions: IntCounterVec,
    pub notices: IntCounter,
}

impl DelivererMetrics {
    pub fn new(registry: &Registry) -> Self {
        let m = DelivererMetrics {
            deliveries: counter_vec(
                registry,
                "swallow_deliveries_total",
                "Delivery jobs handled, by outcome (delivered, retried, dead, dropped, rate_limited).",
                &["outcome"],
            ),
            attempts: counter_vec(
                registry,
                "swallow_delivery_attempts_total",
                "HTTP attempts, by status class (2xx..5xx) or failure (timeout, connect, error, blocked).",
                &["class"],
            ),
            dead: counter_vec(
                registry,
                "swallow_deliveries_dead_total",
                "Delivery jobs dead-lettered, by reason.",
                &["reason"],
            ),
            duration: register(
                registry,
                Histogram::with_opts(
                    HistogramOpts::new("swallow_delivery_duration_seconds", "Duration of one HTTP attempt.").buckets(
                        vec![0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0],
                    ),
                )
                .expect("valid histogram"),
            ),
            in_flight: gauge(registry, "swallow_deliveries_in_flight", "HTTP attempts under way."),
            replies_queued: counter(
                registry,
                "swallow_replies_queued_total",
                "Handler answers with text handed to the responder.",
            ),
            deferred: counter_vec(
                registry,
                "swallow_jobs_deferred_total",
                "Jobs parked on the delay ladder without an attempt, by reason (schedule, busy, missed_slot, circuit_open).",
                &["reason"],
            ),
            shards_held: gauge(
                registry,
                "swallow_deliverer_shards_held",
                "Delivery shards this replica serves.",
            ),
            members: gauge(
                registry,
                "swallow_deliverer_members",
                "Deliverer replicas this replica hears from (itself included).",
            ),
            circuits_open: gauge(
                registry,
                "swallow_circuits_open",
                "Circuits (integration, URL) open or half-open now: their jobs wait, unattempted.",
            ),
            circuit_transitions: counter_vec(
                registry,
                "swallow_circuit_transitions_total",
                "Circuit breaker transitions, by the state entered (open, half_open, closed).",
                &["to"],
            ),
            notices: counter(
                registry,
                "swallow_failure_notices_total",
                "Failure notices handed to the responder (on_failure = \"notify\").",
            ),
        };
        m.show_every_label();
        m
    }

    /// Makes every bounded label value show (at 0) from the start, so a
    /// rate over it is defined before the first event.
    fn show_every_label(&self) {
        for o in OUTCOMES {
            self.deliveries.with_label_values(&[o]);
        }
        for c in CLASSES {
            self.attempts.with_label_values(&[c]);
        }
        for r in DeadReason::DELIVERY {
            self.dead.with_label_values(&[r.as_str()]);
        }
        for r in ["schedule", "busy", "missed_slot", "circuit_open"] {
            self.deferred.with_label_values(&[r]);
        }
        for to in crate::circuit::CircuitState::ALL {
            self.circuit_transitions.with_label_values(&[to.label()]);
        }
    }

    /// Counts a job's visit by what was carried out for it.
    pub fn count(&self, settled: Settled) {
        let outcome = |o: &str| self.deliveries.with_label_values(&[o]).inc();
        let deferred = |r: &str| self.deferred.with_label_values(&[r]).inc();
        match settled {
            Settled::Done => outcome("delivered"),
            Settled::Forwarded => {
                outcome("delivered");
                self.replies_queued.inc();
            }
            Settled::Dropped => outcome("dropped"),
            Settled::Parked(ParkReason::Retry) => outcome("retried"),
            Settled::Parked(ParkReason::RateLimited) => outcome("rate_limited"),
            Settled::Parked(ParkReason::MissedSlot) => deferred("missed_slot"),
            Settled::Parked(ParkReason::NotDue) => deferred("schedule"),
            Settled::Parked(ParkReason::Busy) => deferred("busy"),
            Settled::Parked(ParkReason::CircuitOpen) => deferred("circuit_open"),
            Settled::Dead(reason) => {
                outcome("dead");
                self.dead.with_label_values(&[reason.as_str()]).inc();
            }
        }
    }
}
