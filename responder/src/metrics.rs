//! The responder's metrics (docs/contract.md §7). Each reply's visit is counted
//! once, by [`ResponderMetrics::count`], after it was carried out: a reply
//! the sink refused is `rejected` (and dead-lettered), not also `dead`.

use prometheus::{Histogram, HistogramOpts, IntCounterVec, Registry};
use swallow_shared::job::lifecycle::{DeadReason, ParkReason, Settled};
use swallow_shared::metrics::{counter_vec, register};

pub const OUTCOMES: [&str; 5] = ["posted", "retried", "dead", "rate_limited", "rejected"];

#[derive(Clone)]
pub(crate) struct ResponderMetrics {
    pub replies: IntCounterVec,
    pub end_to_end: Histogram,
    pub post_duration: Histogram,
}

impl ResponderMetrics {
    pub fn new(registry: &Registry) -> Self {
        let m = ResponderMetrics {
            replies: counter_vec(
                registry,
                "swallow_replies_total",
                "Replies handled, by outcome (posted, retried, dead, rate_limited, rejected).",
                &["outcome"],
            ),
            end_to_end: register(
                registry,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "swallow_end_to_end_latency_seconds",
                        "From the triggering event's ts to its reply posted.",
                    )
                    .buckets(vec![
                        0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
                    ]),
                )
                .expect("valid histogram"),
            ),
            post_duration: register(
                registry,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "swallow_reply_post_duration_seconds",
                        "Duration of one attempt to post a reply.",
                    )
                    .buckets(vec![0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]),
                )
                .expect("valid histogram"),
            ),
        };
        for o in OUTCOMES {
            m.replies.with_label_values(&[o]);
        }
        m
    }

    /// Counts a reply's visit by what was carried out for it.
    pub fn count(&self, settled: Settled) {
        let outcome = match settled {
            Settled::Done => "posted",
            Settled::Parked(ParkReason::Retry) => "retried",
            Settled::Parked(ParkReason::RateLimited | ParkReason::MissedSlot) => "rate_limited",
            Settled::Dead(DeadReason::Rejected) => "rejected",
            Settled::Dead(_) => "dead",
            // Not due yet: the same reply, counted when it is handled.
            Settled::Parked(ParkReason::NotDue | ParkReason::Busy | ParkReason::CircuitOpen)
            | Settled::Dropped
            | Settled::Forwarded => return,
        };
        self.replies.with_label_values(&[outcome]).inc();
    }
}
