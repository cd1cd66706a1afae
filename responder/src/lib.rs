//! `swallow-responder`: posts handler replies back into their channels.
//!
//! A reply is acknowledged only after the sink confirmed it (a publisher
//! confirm, or a 2xx with `ok:true`), or after it was parked for a retry or
//! for its channel's pace, or dead-lettered to `<prefix>.replies.dead` — each
//! confirmed by the broker first. Pacing and retries use the same delay
//! ladder and retry schedule as the deliverer.

mod metrics;
pub mod sink;

use std::sync::Arc;
use std::time::{Duration, Instant};

use lapin::Connection;
use lapin::message::Delivery;
use lapin::options::BasicAckOptions;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use swallow_shared::broker::{self, ConfirmedPublisher, Health, SessionError};
use swallow_shared::config::{RateLimit, Sink};
use swallow_shared::consume::{ConsumeOptions, consume};
use swallow_shared::delivery_log::{DeliveryLog, LogRecord, Outcome};
use swallow_shared::messages::{MESSAGE_VERSION, ReplyJob, now_millis};
use swallow_shared::pacing::{RateLimiter, Slot, Turn};
use swallow_shared::retry::{RetryBudget, RetryDecision, RetrySchedule};
use swallow_shared::stage::{ListenError, Running, StageParts};
use swallow_shared::{Config, Integration, Integrations, Stage, Topology, delay};

use metrics::ResponderMetrics;
pub use sink::{BOT_ID, OutboundReply, Posted, ReplySink};

/// How long shutdown waits for replies being posted.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(15);

/// The responder could not start.
#[derive(Debug, thiserror::Error)]
pub enum ResponderError {
    #[error(transparent)]
    Listen(#[from] ListenError),
    #[error("building the HTTP client: {0}")]
    Client(#[from] reqwest::Error),
}

/// A started responder.
pub type Responder = Running;

/// Runs the responder until `shutdown` is cancelled.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), ResponderError> {
    start(config, shutdown).await?.join().await;
    Ok(())
}

/// Starts the responder and returns once its listener is bound.
pub async fn start(config: Config, shutdown: CancellationToken) -> Result<Responder, ResponderError> {
    let topology = Topology::of(&config.broker);
    let client = || {
        reqwest::Client::builder()
            .user_agent(swallow_shared::USER_AGENT)
            .redirect(reqwest::redirect::Policy::none())
            .build()
    };
    let sink = match &config.responder.sink {
        Sink::Amqp => ReplySink::Amqp {
            exchange: topology.chat_outbound_exchange(),
        },
        Sink::Slack { api_base, token } => {
            let base = api_base.as_str().trim_end_matches('/');
            ReplySink::Slack {
                endpoint: format!("{base}/chat.postMessage")
                    .parse()
                    .expect("a base URL plus a path is a URL"),
                token: token.clone(),
                client: client()?,
            }
        }
        Sink::Webhook { url } => ReplySink::Webhook {
            url: url.clone(),
            client: client()?,
        },
    };
    let parts = StageParts::new(Stage::Responder, &config, &shutdown).await?;
    let metrics = ResponderMetrics::new(&parts.registry);
    info!(sink = sink.name(), "responder posting replies");
    let ctx = Arc::new(Context {
        queue: topology.replies_queue(),
        dead_queue: topology.replies_dead_queue(),
        topology,
        prefetch: config.broker.prefetch,
        sink,
        integrations: parts.integrations.clone(),
        pace: config.responder.per_channel,
        limiter: RateLimiter::new(),
        schedule: RetrySchedule::default(),
        max_attempts: config.responder.max_attempts,
        max_age: config.responder.max_age,
        timeout: config.responder.timeout,
        metrics,
        log: parts.log.clone(),
        health: parts.health.clone(),
        shutdown: shutdown.clone(),
    });
    Ok(parts.run(&config, shutdown, move |connection| session(connection, ctx.clone())))
}

struct Context {
    topology: Topology,
    queue: String,
    dead_queue: String,
    prefetch: u16,
    sink: ReplySink,
    integrations: watch::Receiver<Arc<Integrations>>,
    pace: RateLimit,
    limiter: RateLimiter<(String, String)>,
    schedule: RetrySchedule,
    max_attempts: u32,
    max_age: Duration,
    timeout: Duration,
    metrics: ResponderMetrics,
    log: DeliveryLog,
    health: Health,
    shutdown: CancellationToken,
}

async fn session(connection: Arc<Connection>, ctx: Arc<Context>) -> Result<(), SessionError> {
    let options = ConsumeOptions {
        stage: "responder",
        topology: &ctx.topology,
        queue: &ctx.queue,
        prefetch: ctx.prefetch,
        health: &ctx.health,
        shutdown: &ctx.shutdown,
        grace: SHUTDOWN_GRACE,
    };
    consume(connection, options, |delivery, publisher| {
        handle(delivery, ctx.clone(), publisher)
    })
    .await
}

/// Applies the integration's identity, the answer's overrides and the thread.
pub fn outbound(reply: &ReplyJob, integration: Option<&Integration>) -> OutboundReply {
    let a = &reply.answer;
    let username = a
        .username
        .clone()
        .or_else(|| integration.map(|i| i.bot_name.clone()))
        .unwrap_or_else(|| reply.integration_id.clone());
    // An icon in the answer replaces the integration's, whichever kind it is.
    let (icon_url, icon_emoji) = if a.icon_url.is_some() || a.icon_emoji.is_some() {
        (a.icon_url.clone(), a.icon_emoji.clone())
    } else {
        (
            integration.and_then(|i| i.icon_url.clone()),
            integration.and_then(|i| i.icon_emoji.clone()),
        )
    };
    // An explicit thread wins; "comment" threads under the triggering
    // message; a message that was already in a thread is answered there.
    let thread_ts = a
        .thread_ts
        .clone()
        .or_else(|| reply.event_thread_ts.clone())
        .or_else(|| (a.response_type.as_deref() == Some("comment")).then(|| reply.in_reply_to.clone()));
    OutboundReply {
        team_id: reply.team_id.clone(),
        channel_id: reply.channel_id.clone(),
        thread_ts,
        text: a.text.clone(),
        username,
        icon_url,
        icon_emoji,
        attachments: a.attachments.clone(),
        integration_id: reply.integration_id.clone(),
        delivery_id: reply.delivery_id.clone(),
        in_reply_to: reply.in_reply_to.clone(),
        bot_id: BOT_ID.to_owned(),
        subtype: "bot_message",
    }
}

enum Action {
    Ack,
    Park {
        reply: ReplyJob,
        wait: Duration,
    },
    Dead {
        body: Vec<u8>,
        reason: &'static str,
        detail: String,
        reply: Option<ReplyJob>,
    },
}

async fn handle(delivery: Delivery, ctx: Arc<Context>, publisher: ConfirmedPublisher) -> Result<(), SessionError> {
    match decide(&delivery, &ctx, &publisher).await {
        Action::Ack => {}
        Action::Park { reply, wait } => {
            let body = serde_json::to_vec(&reply).expect("a reply always serializes");
            delay::park(
                &publisher,
                &ctx.topology,
                &ctx.queue,
                &body,
                broker::persistent_json(),
                wait,
            )
            .await?;
        }
        Action::Dead {
            body,
            reason,
            detail,
            reply,
        } => {
            let mut headers = vec![("reason", reason.to_owned()), ("error", detail.clone())];
            if let Some(r) = &reply {
                headers.push(("integration", r.integration_id.clone()));
                headers.push(("delivery-id", r.delivery_id.clone()));
                headers.push(("attempts", r.attempt.to_string()));
                headers.push(("channel", format!("{}.{}", r.team_id, r.channel_id)));
            }
            delay::dead_letter(&publisher, &ctx.dead_queue, &body, &headers).await?;
            ctx.metrics.replies.with_label_values(&["dead"]).inc();
            if let Some(r) = &reply {
                ctx.log
                    .record(LogRecord::reply(Outcome::ReplyDead, r).with_error(&detail));
            }
            warn!(reason, error = %detail, "reply dead-lettered");
        }
    }
    delivery.ack(BasicAckOptions::default()).await?;
    Ok(())
}

fn dead(reply: ReplyJob, reason: &'static str, detail: String) -> Action {
    Action::Dead {
        body: serde_json::to_vec(&reply).expect("a reply always serializes"),
        reason,
        detail,
        reply: Some(reply),
    }
}

async fn decide(delivery: &Delivery, ctx: &Context, publisher: &ConfirmedPublisher) -> Action {
    let mut reply: ReplyJob = match serde_json::from_slice(&delivery.data) {
        Ok(r) => r,
        Err(e) => {
            return Action::Dead {
                body: delivery.data.clone(),
                reason: "invalid_reply",
                detail: format!("not a reply: {e}"),
                reply: None,
            };
        }
    };
    if reply.v > MESSAGE_VERSION {
        let detail = format!("reply version {} is newer than this responder", reply.v);
        return dead(reply, "unsupported_version", detail);
    }
    if let Some(wait) = delay::wait_until_due(reply.not_before_ms).await {
        return Action::Park { reply, wait };
    }
    let now = now_millis();
    let deadline = reply.created_at_ms + ctx.max_age.as_millis() as u64;
    if now >= deadline {
        let detail = reply.last_error.clone().unwrap_or_else(|| "not posted in time".into());
        return dead(reply, "max_age", detail);
    }

    // Pace per channel, so a chatty handler cannot flood it.
    let key = (reply.team_id.clone(), reply.channel_id.clone());
    let slot = Slot {
        reserved: &mut reply.rate_reserved,
        missed: &mut reply.slot_missed,
        not_before_ms: &mut reply.not_before_ms,
    };
    match ctx
        .limiter
        .turn(&key, &ctx.pace, slot, now, Duration::from_millis(deadline - now))
    {
        Turn::Go => {}
        Turn::Wait { wait, .. } => {
            ctx.metrics.replies.with_label_values(&["rate_limited"]).inc();
            return Action::Park { reply, wait };
        }
        Turn::TooLong(wait) => {
            return dead(reply, "max_age", format!("the channel's next slot is {wait:?} away"));
        }
    }

    let integrations = ctx.integrations.borrow().clone();
    let out = outbound(&reply, integrations.get(&reply.integration_id).map(|i| i.as_ref()));
    let started = Instant::now();
    let posted = ctx.sink.post(&out, publisher, ctx.timeout).await;
    let took = started.elapsed();
    ctx.metrics.post_duration.observe(took.as_secs_f64());
    reply.attempt += 1;
    match posted {
        Posted::Ok => {
            ctx.metrics.replies.with_label_values(&["posted"]).inc();
            ctx.log
                .record(LogRecord::reply(Outcome::ReplyPosted, &reply).with_duration(took));
            if let Some(ts_ms) = swallow_shared::event::ts_to_millis(&reply.in_reply_to) {
                let latency = now_millis().saturating_sub(ts_ms);
                ctx.metrics.end_to_end.observe(latency as f64 / 1000.0);
            }
            Action::Ack
        }
        Posted::Rejected { error } => {
            ctx.metrics.replies.with_label_values(&["rejected"]).inc();
            dead(reply, "rejected", error)
        }
        Posted::Retry { error, retry_after } => {
            reply.last_error = Some(error.clone());
            let budget = RetryBudget {
                max_attempts: ctx.max_attempts,
                max_age: ctx.max_age,
                created_at_ms: reply.created_at_ms,
            };
            let now = now_millis();
            match ctx
                .schedule
                .after_failure(budget, reply.attempt, retry_after, now, &error)
            {
                RetryDecision::GiveUp { reason, detail } => dead(reply, reason, detail),
                RetryDecision::RetryIn(wait) => {
                    ctx.metrics.replies.with_label_values(&["retried"]).inc();
                    ctx.log.record(
                        LogRecord::reply(Outcome::ReplyRetried, &reply)
                            .with_duration(took)
                            .with_error(&error),
                    );
                    reply.not_before_ms = Some(now + wait.as_millis() as u64);
                    Action::Park { reply, wait }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use swallow_shared::messages::HandlerAnswer;

    fn reply(answer: HandlerAnswer, event_thread_ts: Option<&str>) -> ReplyJob {
        ReplyJob {
            v: 1,
            delivery_id: "msg_1".into(),
            integration_id: "googlebot".into(),
            team_id: "T1".into(),
            channel_id: "C1".into(),
            in_reply_to: "100.000001".into(),
            event_thread_ts: event_thread_ts.map(str::to_owned),
            answer,
            created_at_ms: 0,
            attempt: 0,
            not_before_ms: None,
            rate_reserved: false,
            slot_missed: false,
            last_error: None,
        }
    }

    fn integration() -> Arc<Integration> {
        let c = swallow_shared::Config::parse(
            "[[integrations]]\nid = \"googlebot\"\nteam_id = \"T1\"\nchannel = \"C1\"\nurls = [\"http://x/\"]\ntoken = \"t\"\nbot_name = \"Google Bot\"\nicon_emoji = \":bird:\"\n",
            None,
        )
        .unwrap();
        c.integrations.list[0].clone()
    }

    #[test]
    fn identity_overrides_and_threads() {
        let i = integration();
        let text = |t: &str| HandlerAnswer {
            text: t.into(),
            ..Default::default()
        };
        let plain = outbound(&reply(text("hi"), None), Some(&i));
        assert_eq!(plain.username, "Google Bot");
        assert_eq!(plain.icon_emoji.as_deref(), Some(":bird:"));
        assert_eq!(plain.thread_ts, None);
        assert_eq!(plain.bot_id, BOT_ID);
        assert_eq!(plain.subtype, "bot_message");

        let custom = HandlerAnswer {
            username: Some("Tim".into()),
            icon_url: Some("http://x/i.png".into()),
            response_type: Some("comment".into()),
            ..text("hi")
        };
        let o = outbound(&reply(custom, None), Some(&i));
        assert_eq!(o.username, "Tim");
        assert_eq!(
            (o.icon_url.as_deref(), o.icon_emoji.as_deref()),
            (Some("http://x/i.png"), None)
        );
        assert_eq!(
            o.thread_ts.as_deref(),
            Some("100.000001"),
            "comment threads under the trigger"
        );

        let in_thread = outbound(&reply(text("hi"), Some("90.0")), Some(&i));
        assert_eq!(in_thread.thread_ts.as_deref(), Some("90.0"));
        let explicit = HandlerAnswer {
            thread_ts: Some("80.0".into()),
            ..text("hi")
        };
        assert_eq!(
            outbound(&reply(explicit, Some("90.0")), Some(&i)).thread_ts.as_deref(),
            Some("80.0")
        );
        assert_eq!(outbound(&reply(text("hi"), None), None).username, "googlebot");
    }
}
