//! Every exchange and queue swallow declares, all under one prefix.
//!
//! Queues are durable quorum queues; messages are published persistent. The
//! durable delay used for retries and rate limits is a ladder of TTL queues:
//! a message parked on step `n` is published to the fanout exchange
//! `<prefix>.delay.<ms>ms` with the routing key of the queue it must return
//! to; the step's queue holds it for exactly `ms` (one TTL per queue, so
//! expiry at the head is always in order) and dead-letters it, at least once,
//! through the default exchange, which routes it by that key back to its work
//! queue. A delay is a sum of steps (largest first), so any delay up to the
//! 5-minute cap needs a handful of hops and no broker plugin.

use std::time::Duration;

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{Channel, Connection, ErrorKind, ExchangeKind};
use tracing::warn;

/// The shortest delay step; shorter waits are not parked.
pub const DELAY_STEP_MIN: Duration = Duration::from_millis(100);
/// Number of steps: 100 ms · 2^k for k in 0..DELAY_STEPS (100 ms … 409.6 s).
pub const DELAY_STEPS: u32 = 13;

/// Delivery shards when the configuration does not say.
pub const DEFAULT_SHARDS: u32 = 16;

/// Deliveries of one message from a work queue (a consumer that dies or
/// hands it back counts) before the broker moves it to the stage's dead or
/// invalid queue, when the configuration does not say.
pub const DEFAULT_DELIVERY_LIMIT: u32 = 20;

/// The names of everything declared under one prefix.
#[derive(Debug, Clone)]
pub struct Topology {
    prefix: String,
    shards: u32,
    delivery_limit: u32,
}

impl Topology {
    /// The topology of `prefix` with the default number of delivery shards.
    pub fn new(prefix: impl Into<String>) -> Self {
        Self::with_shards(prefix, DEFAULT_SHARDS)
    }

    pub fn with_shards(prefix: impl Into<String>, shards: u32) -> Self {
        Topology {
            prefix: prefix.into(),
            shards: shards.max(1),
            delivery_limit: DEFAULT_DELIVERY_LIMIT,
        }
    }

    /// The same topology with work queues that set a message aside after
    /// `limit` deliveries.
    pub fn with_delivery_limit(mut self, limit: u32) -> Self {
        self.delivery_limit = limit.max(1);
        self
    }

    /// Each work queue and the queue its messages go to past the delivery
    /// limit.
    pub fn work_queues(&self) -> Vec<(String, String)> {
        let mut q = vec![
            (self.events_queue(), self.events_invalid_queue()),
            (self.replies_queue(), self.replies_dead_queue()),
        ];
        q.extend(
            self.delivery_queues()
                .into_iter()
                .map(|d| (d, self.deliveries_dead_queue())),
        );
        q
    }

    /// A work queue's arguments: quorum, the delivery limit, and the broker's
    /// dead-lettering (at least once, so `reject-publish`) to `dead`.
    pub fn work_queue_args(&self, dead: &str) -> FieldTable {
        let mut args = quorum_args();
        args.insert(
            "x-delivery-limit".into(),
            AMQPValue::LongLongInt(self.delivery_limit.into()),
        );
        let text = |v: &str| AMQPValue::LongString(LongString::from(v));
        args.insert("x-dead-letter-exchange".into(), text(""));
        args.insert("x-dead-letter-routing-key".into(), text(dead));
        args.insert("x-dead-letter-strategy".into(), text("at-least-once"));
        args.insert("x-overflow".into(), text("reject-publish"));
        args
    }

    /// The RabbitMQ policies that give work queues declared by a version
    /// without a delivery limit the same behaviour: `(name, pattern,
    /// definition as JSON)`, for `rabbitmqctl set_policy --apply-to queues`.
    pub fn delivery_limit_policies(&self) -> Vec<(String, String, String)> {
        let p = regex_escape(&self.prefix);
        let policy = |name: &str, pattern: String, dead: String| {
            let definition = serde_json::json!({
                "delivery-limit": self.delivery_limit,
                "dead-letter-exchange": "",
                "dead-letter-routing-key": dead,
                "dead-letter-strategy": "at-least-once",
                "overflow": "reject-publish",
            });
            (format!("{}.{name}", self.prefix), pattern, definition.to_string())
        };
        vec![
            policy(
                "events-delivery-limit",
                format!("^{p}\\.events\\.inbox$"),
                self.events_invalid_queue(),
            ),
            policy(
                "deliveries-delivery-limit",
                format!("^{p}\\.deliveries\\.[0-9]+$"),
                self.deliveries_dead_queue(),
            ),
            policy(
                "replies-delivery-limit",
                format!("^{p}\\.replies$"),
                self.replies_dead_queue(),
            ),
        ]
    }

    pub fn shards(&self) -> u32 {
        self.shards
    }

    /// The delivery shard an integration's jobs go to: a stable hash
    /// (FNV-1a) of its id, so every stage and every version agrees.
    pub fn shard_of(&self, integration_id: &str) -> u32 {
        let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
        for byte in integration_id.as_bytes() {
            hash ^= u64::from(*byte);
            hash = hash.wrapping_mul(0x0100_0000_01b3);
        }
        (hash % u64::from(self.shards)) as u32
    }

    /// Delivery shard `k`'s work queue. Each shard is consumed by one
    /// deliverer at a time (see `deliverer::shards`).
    pub fn delivery_shard_queue(&self, k: u32) -> String {
        // Joined, not `format!`ted: the matcher names one per job.
        [self.prefix.as_str(), ".deliveries.", &k.to_string()].concat()
    }

    /// The work queue of an integration's jobs.
    pub fn delivery_queue_for(&self, integration_id: &str) -> String {
        self.delivery_shard_queue(self.shard_of(integration_id))
    }

    pub fn delivery_queues(&self) -> Vec<String> {
        (0..self.shards).map(|k| self.delivery_shard_queue(k)).collect()
    }

    /// The exclusive queue whose holder owns delivery shard `k` (a lease that
    /// ends with the holder's connection).
    pub fn shard_lease_queue(&self, k: u32) -> String {
        format!("{}.deliveries.{k}.lease", self.prefix)
    }

    /// Fanout exchange the deliverers announce themselves on.
    pub fn deliverers_exchange(&self) -> String {
        format!("{}.deliverers", self.prefix)
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Topic exchange the chat platform publishes events to.
    pub fn events_exchange(&self) -> String {
        format!("{}.events", self.prefix)
    }
    /// The matchers' shared work queue, bound to the events exchange with `#`.
    pub fn events_queue(&self) -> String {
        format!("{}.events.inbox", self.prefix)
    }
    pub fn events_invalid_queue(&self) -> String {
        format!("{}.events.invalid", self.prefix)
    }
    pub fn deliveries_dead_queue(&self) -> String {
        format!("{}.deliveries.dead", self.prefix)
    }
    pub fn replies_queue(&self) -> String {
        format!("{}.replies", self.prefix)
    }
    pub fn replies_dead_queue(&self) -> String {
        format!("{}.replies.dead", self.prefix)
    }
    /// Topic exchange replies go to with `sink = "amqp"`.
    pub fn chat_outbound_exchange(&self) -> String {
        format!("{}.chat.outbound", self.prefix)
    }
    /// The delivery log: a stream, declared by the stages' log appenders
    /// (see `delivery_log`), not by [`Topology::declare`].
    pub fn log_stream(&self) -> String {
        format!("{}.log", self.prefix)
    }
    /// The exchange (and queue) of one delay step.
    pub fn delay_step_name(&self, step: u32) -> String {
        format!("{}.delay.{}ms", self.prefix, delay_step(step).as_millis())
    }

    /// Every queue name, for cleanup and inspection.
    pub fn queues(&self) -> Vec<String> {
        let mut q = vec![
            self.events_queue(),
            self.events_invalid_queue(),
            self.deliveries_dead_queue(),
            self.replies_queue(),
            self.replies_dead_queue(),
            self.log_stream(),
        ];
        q.extend(self.delivery_queues());
        q.extend((0..DELAY_STEPS).map(|s| self.delay_step_name(s)));
        q
    }

    /// Every exchange name, for cleanup and inspection.
    pub fn exchanges(&self) -> Vec<String> {
        let mut e = vec![
            self.events_exchange(),
            self.chat_outbound_exchange(),
            self.deliverers_exchange(),
        ];
        e.extend((0..DELAY_STEPS).map(|s| self.delay_step_name(s)));
        e
    }

    /// Declares the whole topology, work queues with their delivery limit
    /// (see `declare_on` for queues an earlier version declared). Idempotent;
    /// every stage declares it at start and after every reconnect, so any
    /// stage may be started first.
    pub async fn declare(&self, channel: &Channel) -> Result<(), lapin::Error> {
        self.declare_set_aside(channel).await?;
        for (queue, dead) in self.work_queues() {
            declare_quorum(channel, &queue, self.work_queue_args(&dead)).await?;
        }
        self.declare_rest(channel).await
    }

    /// The queues messages are set aside in.
    async fn declare_set_aside(&self, channel: &Channel) -> Result<(), lapin::Error> {
        for queue in [
            self.events_invalid_queue(),
            self.deliveries_dead_queue(),
            self.replies_dead_queue(),
        ] {
            declare_quorum_queue(channel, &queue).await?;
        }
        Ok(())
    }

    /// Declares the whole topology on channels of its own, tolerating work
    /// queues declared by an earlier version without a delivery limit: the
    /// broker refuses to declare them again with other arguments
    /// (`PRECONDITION_FAILED`, which closes the channel), so each of those is
    /// declared passively instead, and a warning names the policies that
    /// give them the limit (`delivery_limit_policies`). The stages call this.
    pub async fn declare_on(&self, connection: &Connection) -> Result<(), lapin::Error> {
        let mut channel = connection.create_channel().await?;
        match self.declare(&channel).await {
            Ok(()) => {
                let _ = channel.close(200, "declared".into()).await;
                return Ok(());
            }
            Err(e) if !precondition_failed(&e) => return Err(e),
            Err(_) => channel = connection.create_channel().await?,
        }
        self.declare_set_aside(&channel).await?;
        let mut earlier = Vec::new();
        for (queue, dead) in self.work_queues() {
            match declare_quorum(&channel, &queue, self.work_queue_args(&dead)).await {
                Ok(()) => {}
                Err(e) if precondition_failed(&e) => {
                    channel = connection.create_channel().await?;
                    let passive = QueueDeclareOptions {
                        passive: true,
                        ..Default::default()
                    };
                    channel
                        .queue_declare(queue.as_str().into(), passive, FieldTable::default())
                        .await?;
                    earlier.push(queue);
                }
                Err(e) => return Err(e),
            }
        }
        self.declare_rest(&channel).await?;
        let _ = channel.close(200, "declared".into()).await;
        let policies: Vec<String> = self
            .delivery_limit_policies()
            .into_iter()
            .map(|(name, ..)| name)
            .collect();
        warn!(
            queues = %earlier.join(", "),
            policies = %policies.join(", "),
            "work queues declared by an earlier version, without a delivery limit: a message that kills a stage \
             is redelivered for ever until the policies are applied (docs/contract.md §3)"
        );
        Ok(())
    }

    /// The exchanges, the inbox's binding and the delay ladder.
    async fn declare_rest(&self, channel: &Channel) -> Result<(), lapin::Error> {
        let durable_exchange = ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        };
        for exchange in [self.events_exchange(), self.chat_outbound_exchange()] {
            channel
                .exchange_declare(
                    exchange.as_str().into(),
                    ExchangeKind::Topic,
                    durable_exchange,
                    FieldTable::default(),
                )
                .await?;
        }
        channel
            .exchange_declare(
                self.deliverers_exchange().as_str().into(),
                ExchangeKind::Fanout,
                durable_exchange,
                FieldTable::default(),
            )
            .await?;
        channel
            .queue_bind(
                self.events_queue().as_str().into(),
                self.events_exchange().as_str().into(),
                "#".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
        for step in 0..DELAY_STEPS {
            let name = self.delay_step_name(step);
            channel
                .exchange_declare(
                    name.as_str().into(),
                    ExchangeKind::Fanout,
                    durable_exchange,
                    FieldTable::default(),
                )
                .await?;
            let mut args = quorum_args();
            args.insert(
                "x-message-ttl".into(),
                AMQPValue::LongLongInt(delay_step(step).as_millis() as i64),
            );
            args.insert(
                "x-dead-letter-exchange".into(),
                AMQPValue::LongString(LongString::from("")),
            );
            args.insert(
                "x-dead-letter-strategy".into(),
                AMQPValue::LongString(LongString::from("at-least-once")),
            );
            args.insert(
                "x-overflow".into(),
                AMQPValue::LongString(LongString::from("reject-publish")),
            );
            declare_quorum(channel, &name, args).await?;
            channel
                .queue_bind(
                    name.as_str().into(),
                    name.as_str().into(),
                    "".into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await?;
        }
        Ok(())
    }
}

/// Whether the broker refused a declaration with `PRECONDITION_FAILED`
/// (a queue exists with other arguments).
fn precondition_failed(e: &lapin::Error) -> bool {
    matches!(e.kind(), ErrorKind::ProtocolError(amqp)
        if matches!(amqp.kind(), AMQPErrorKind::Soft(AMQPSoftError::PRECONDITIONFAILED)))
}

/// `text` with the regular expression's special characters escaped, for the
/// patterns swallow writes for others: RabbitMQ's policies here, a Matrix
/// registration's user namespace in the matcher.
pub fn regex_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if "\\.+*?()|[]{}^$".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// Declares the durable quorum queue `name` (idempotent).
pub async fn declare_quorum_queue(channel: &Channel, name: &str) -> Result<(), lapin::Error> {
    declare_quorum(channel, name, quorum_args()).await
}

fn quorum_args() -> FieldTable {
    let mut args = FieldTable::default();
    args.insert("x-queue-type".into(), AMQPValue::LongString(LongString::from("quorum")));
    args
}

async fn declare_quorum(channel: &Channel, name: &str, args: FieldTable) -> Result<(), lapin::Error> {
    channel
        .queue_declare(
            name.into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            args,
        )
        .await
        .map(|_| ())
}

/// The length of delay step `step`.
pub(crate) fn delay_step(step: u32) -> Duration {
    DELAY_STEP_MIN * 2u32.pow(step)
}

/// The step to park a message on for a remaining wait of `remaining`: the
/// longest step not longer than it. `None` when the wait is too short to park.
pub(crate) fn step_for(remaining: Duration) -> Option<u32> {
    if remaining < DELAY_STEP_MIN {
        return None;
    }
    (0..DELAY_STEPS).rev().find(|&s| delay_step(s) <= remaining)
}

/// How long to park a message that is due in `remaining` and may come back
/// up to `late_ok` after that as good as on time (a rate-limit slot's
/// grace): a step's length within that window when one fits, so that this
/// is its last trip; otherwise `remaining` (the longest step not longer,
/// and more trips for what is left). Waits too short to park stay as they
/// are: waiting them out costs less than a trip.
pub(crate) fn park_for(remaining: Duration, late_ok: Duration) -> Duration {
    if remaining < DELAY_STEP_MIN {
        return remaining;
    }
    (0..DELAY_STEPS)
        .map(delay_step)
        .find(|&step| step >= remaining && step - remaining <= late_ok)
        .unwrap_or(remaining)
}

/// A wait of at least `wanted` made in one trip on the ladder: the shortest
/// step not shorter than it (the longest step at most). For waits where
/// coming back a little late costs nothing and every extra trip costs a
/// broker round (jobs behind an open circuit).
pub fn one_trip(wanted: Duration) -> Duration {
    (0..DELAY_STEPS)
        .map(delay_step)
        .find(|&step| step >= wanted)
        .unwrap_or(delay_step(DELAY_STEPS - 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_trip_rounds_up_to_a_step() {
        assert_eq!(one_trip(Duration::ZERO), Duration::from_millis(100));
        assert_eq!(one_trip(Duration::from_millis(6_400)), Duration::from_millis(6_400));
        assert_eq!(one_trip(Duration::from_millis(7_000)), Duration::from_millis(12_800));
        assert_eq!(one_trip(Duration::from_secs(3_600)), Duration::from_millis(409_600));
    }

    #[test]
    fn a_wait_that_may_end_late_takes_the_step_that_ends_it_in_one_trip() {
        let ms = Duration::from_millis;
        // 6.2 s may end up to 0.5 s late: one trip of 6.4 s.
        assert_eq!(park_for(ms(6_200), ms(500)), ms(6_400));
        assert_eq!(step_for(park_for(ms(6_200), ms(500))), Some(6));
        // Not when that would be later than allowed, nor without leeway.
        assert_eq!(park_for(ms(5_800), ms(500)), ms(5_800));
        assert_eq!(park_for(ms(6_200), Duration::ZERO), ms(6_200));
        assert_eq!(park_for(ms(6_400), Duration::ZERO), ms(6_400));
        // A remainder too short to park is waited out, not made a trip.
        assert_eq!(park_for(ms(60), ms(500)), ms(60));
        // Over waits up to 5 minutes, half a second of leeway saves a
        // fifth of the trips.
        let trips = |late_ok: Duration| -> u32 {
            (1..=3_000u64)
                .map(|tenth| {
                    let mut left = ms(tenth * 100 + 37);
                    let mut hops = 0;
                    while let Some(s) = step_for(park_for(left, late_ok)) {
                        hops += 1;
                        let step = delay_step(s);
                        if step >= left {
                            break;
                        }
                        left -= step;
                    }
                    hops
                })
                .sum()
        };
        let (exact, lenient) = (trips(Duration::ZERO), trips(ms(500)));
        assert!(
            lenient * 5 <= exact * 4,
            "{lenient} trips with leeway against {exact} without"
        );
    }

    #[test]
    fn steps_cover_the_range_largest_first() {
        assert_eq!(step_for(Duration::from_millis(99)), None);
        assert_eq!(step_for(Duration::from_millis(100)), Some(0));
        assert_eq!(step_for(Duration::from_millis(399)), Some(1));
        assert_eq!(step_for(Duration::from_secs(300)), Some(11));
        assert_eq!(step_for(Duration::from_secs(3600)), Some(DELAY_STEPS - 1));
        // Any wait up to 5 minutes is reached within 100 ms in at most 12 hops.
        for ms in [100u64, 150, 1000, 1999, 60_000, 299_999, 300_000] {
            let mut left = Duration::from_millis(ms);
            let mut hops = 0;
            while let Some(s) = step_for(left) {
                left -= delay_step(s);
                hops += 1;
            }
            assert!(
                left < DELAY_STEP_MIN && hops <= 12,
                "{ms} ms: {hops} hops, {left:?} left"
            );
        }
    }

    #[test]
    fn shards_are_stable_and_spread() {
        let t = Topology::with_shards("p", 16);
        assert_eq!(
            t.shard_of("googlebot"),
            Topology::with_shards("q", 16).shard_of("googlebot")
        );
        let used: std::collections::BTreeSet<u32> = (0..200).map(|i| t.shard_of(&format!("i{i}"))).collect();
        assert_eq!(used.len(), 16, "200 ids reach every shard");
        assert_eq!(
            t.delivery_queue_for("googlebot"),
            format!("p.deliveries.{}", t.shard_of("googlebot"))
        );
    }

    #[test]
    fn names_carry_the_prefix() {
        let t = Topology::new("p1");
        assert!(
            t.queues()
                .iter()
                .chain(t.exchanges().iter())
                .all(|n| n.starts_with("p1."))
        );
        assert_eq!(t.delay_step_name(0), "p1.delay.100ms");
    }

    #[test]
    fn work_queues_set_aside_past_their_limit_into_their_stages_dead_queue() {
        let t = Topology::with_shards("p", 2).with_delivery_limit(3);
        let dead: std::collections::HashMap<String, String> = t.work_queues().into_iter().collect();
        assert_eq!(dead.len(), 4);
        assert_eq!(dead["p.events.inbox"], "p.events.invalid");
        assert_eq!(dead["p.deliveries.1"], "p.deliveries.dead");
        assert_eq!(dead["p.replies"], "p.replies.dead");
        let args = t.work_queue_args("p.replies.dead");
        let get = |k: &str| args.inner().get(k).cloned();
        assert_eq!(get("x-delivery-limit"), Some(AMQPValue::LongLongInt(3)));
        assert_eq!(
            get("x-dead-letter-routing-key"),
            Some(AMQPValue::LongString("p.replies.dead".into()))
        );
        assert_eq!(
            get("x-dead-letter-strategy"),
            Some(AMQPValue::LongString("at-least-once".into()))
        );
        assert_eq!(get("x-overflow"), Some(AMQPValue::LongString("reject-publish".into())));
    }

    /// The production overlay's policies are the ones `delivery_limit_policies`
    /// gives for the default prefix and limit.
    #[test]
    fn the_production_overlay_applies_these_policies() {
        let file = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../deploy/k8s/overlays/production/rabbitmq-policies.yaml"
        );
        let yaml = std::fs::read_to_string(file).expect("the production overlay's policies");
        let t = Topology::new("swallow");
        for (name, pattern, definition) in t.delivery_limit_policies() {
            let definition: serde_json::Value = serde_json::from_str(&definition).unwrap();
            for line in [
                format!("name: {name}"),
                format!("pattern: '{pattern}'"),
                format!("delivery-limit: {}", definition["delivery-limit"]),
                format!(
                    "dead-letter-routing-key: {}",
                    definition["dead-letter-routing-key"].as_str().unwrap()
                ),
            ] {
                assert!(yaml.contains(&line), "{file} lacks {line:?}");
            }
        }
        assert_eq!(regex_escape("a.b*c"), "a\\.b\\*c");
    }
}
