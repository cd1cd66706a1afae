//! The matcher's own metrics (docs/contract.md §7).

use prometheus::{IntCounter, IntCounterVec, Registry};
use swallow_shared::metrics::{counter, counter_vec};

#[derive(Clone)]
pub(crate) struct MatcherMetrics {
    pub events_received: IntCounter,
    pub events_matched: IntCounter,
    pub events_ignored: IntCounterVec,
    pub events_invalid: IntCounterVec,
    pub jobs_published: IntCounter,
}

impl MatcherMetrics {
    pub fn new(registry: &Registry) -> Self {
        let m = MatcherMetrics {
            events_received: counter(registry, "swallow_events_received_total", "Chat events consumed."),
            events_matched: counter(
                registry,
                "swallow_events_matched_total",
                "Events that triggered at least one integration.",
            ),
            events_ignored: counter_vec(
                registry,
                "swallow_events_ignored_total",
                "Valid events that triggered nothing, by reason (bot, not_public, no_match).",
                &["reason"],
            ),
            events_invalid: counter_vec(
                registry,
                "swallow_events_invalid_total",
                "Events sent to the invalid queue, by reason (too_large, not_json, bad_field).",
                &["reason"],
            ),
            jobs_published: counter(
                registry,
                "swallow_jobs_published_total",
                "Delivery jobs published and confirmed.",
            ),
        };
        for r in ["bot", "not_public", "no_match"] {
            m.events_ignored.with_label_values(&[r]);
        }
        for r in ["too_large", "not_json", "bad_field"] {
            m.events_invalid.with_label_values(&[r]);
        }
        m
    }
}
