//! Metrics every stage exports, registered on the stage's own registry (so
//! several stages can run in one test process).

use prometheus::{IntCounter, IntCounterVec, IntGauge, Opts, Registry};

/// Registers a metric, panicking only on a programming error (a duplicate or
/// malformed name), which the tests catch.
pub fn register<M: prometheus::core::Collector + Clone + 'static>(registry: &Registry, metric: M) -> M {
    registry
        .register(Box::new(metric.clone()))
        .expect("metric names are unique and well formed");
    metric
}

pub fn counter(registry: &Registry, name: &str, help: &str) -> IntCounter {
    register(registry, IntCounter::new(name, help).expect("valid metric"))
}

pub fn counter_vec(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    register(
        registry,
        IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric"),
    )
}

pub fn gauge(registry: &Registry, name: &str, help: &str) -> IntGauge {
    register(registry, IntGauge::new(name, help).expect("valid metric"))
}

/// Broker and configuration metrics shared by all stages.
#[derive(Clone)]
pub struct CommonMetrics {
    pub config_reloads: IntCounterVec,
    pub integrations_loaded: IntGauge,
    pub broker_reconnects: IntCounter,
    pub broker_connected: IntGauge,
}

impl CommonMetrics {
    pub fn new(registry: &Registry) -> Self {
        let m = CommonMetrics {
            config_reloads: counter_vec(
                registry,
                "swallow_config_reloads_total",
                "Configuration reloads, by result (ok or error).",
                &["result"],
            ),
            integrations_loaded: gauge(
                registry,
                "swallow_integrations_loaded",
                "Integrations currently in force.",
            ),
            broker_reconnects: counter(
                registry,
                "swallow_broker_reconnects_total",
                "Times the stage reconnected to the broker after losing it.",
            ),
            broker_connected: gauge(registry, "swallow_broker_connected", "1 while connected to the broker."),
        };
        for result in ["ok", "error"] {
            m.config_reloads.with_label_values(&[result]);
        }
        m
    }
}

/// Counts one up on a gauge for as long as it lives, so work that is
/// cancelled midway (a task aborted at shutdown or on a broken connection)
/// still counts itself out.
pub struct GaugeHold<'a>(&'a IntGauge);

impl<'a> GaugeHold<'a> {
    pub fn new(gauge: &'a IntGauge) -> Self {
        gauge.inc();
        GaugeHold(gauge)
    }
}

impl Drop for GaugeHold<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}
