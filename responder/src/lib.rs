//! `swallow-responder`: posts handler replies back into their channels.
//!
//! A reply is acknowledged only after the sink confirmed it (a publisher
//! confirm, or a 2xx with `ok:true`), or after it was parked for a retry or
//! for its channel's pace, or dead-lettered to `<prefix>.replies.dead` — each
//! confirmed by the broker first. Pacing and retries use the same delay
//! ladder and retry schedule as the deliverer.

pub mod matrix;
mod metrics;
pub mod sink;

use std::sync::Arc;
use std::time::{Duration, Instant};

use std::ops::ControlFlow;

use futures_util::future::Either;
use lapin::Connection;
use lapin::message::Delivery;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::info;

use swallow_shared::broker::consume::{ConsumeOptions, Settler, consume};
use swallow_shared::broker::{ConfirmedPublisher, Health, MatchedReturns, SessionError};
use swallow_shared::config::{RateLimit, Sink};
use swallow_shared::delivery_log::{DeliveryLog, LogRecord, Outcome as Step};
use swallow_shared::job::lifecycle::{
    self, DeadLetter, DeadReason, Disposition, Failure, ParkReason, RetryLimits, Step as Next, take_turn,
    within_max_age,
};
use swallow_shared::job::pacing::RateLimiter;
use swallow_shared::job::retry::RetrySchedule;
use swallow_shared::stage::{Running, StageParts, StartError};
use swallow_shared::wire::messages::{ReplyJob, now_millis};
use swallow_shared::{Config, Integration, Integrations, Stage, Topology};

use metrics::ResponderMetrics;
pub use sink::{BOT_ID, OutboundReply, Posted, ReplySink};

/// How long shutdown waits for replies being posted.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(15);

/// Runs the responder until `shutdown` is cancelled.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), StartError> {
    start(config, shutdown).await?.join().await;
    Ok(())
}

/// Starts the responder and returns once its listener is bound.
pub async fn start(config: Config, shutdown: CancellationToken) -> Result<Running, StartError> {
    let topology = config.broker.topology();
    // Built before anything starts, so that a client that cannot be built
    // leaves nothing running.
    let client = reqwest::Client::builder()
        .user_agent(swallow_shared::USER_AGENT)
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .map_err(StartError::client)?;
    let parts = StageParts::new(Stage::Responder, &config, &shutdown).await?;
    let sink = match &config.responder.sink {
        Sink::Amqp => ReplySink::Amqp {
            exchange: topology.chat_outbound_exchange(),
        },
        Sink::Slack { api_base, .. } => {
            let base = api_base.as_str().trim_end_matches('/');
            ReplySink::Slack {
                endpoint: format!("{base}/chat.postMessage")
                    .parse()
                    .expect("a base URL plus a path is a URL"),
                token: parts.slack_token.clone(),
                client: client.clone(),
            }
        }
        Sink::Webhook { url } => ReplySink::Webhook {
            url: url.clone(),
            client: client.clone(),
        },
    };
    // Replies to events that came through Slack's ingress go back to Slack
    // through its bot token, whatever `sink` says.
    let slack_platform = config.ingress.as_ref().and_then(|i| i.slack.as_ref()).map(|slack| {
        let base = slack.api_base.as_str().trim_end_matches('/');
        ReplySink::Slack {
            endpoint: format!("{base}/chat.postMessage")
                .parse()
                .expect("a base URL plus a path is a URL"),
            token: bot_token(parts.slack_ingress.clone(), shutdown.clone()),
            client: client.clone(),
        }
    });
    // Replies to events from a Matrix homeserver go back to it, as the
    // application service.
    let matrix_platform = config
        .ingress
        .as_ref()
        .and_then(|i| i.matrix.as_ref())
        .map(|m| matrix::MatrixSink::new(m.clone(), parts.matrix_ingress.clone(), client.clone()));
    let metrics = ResponderMetrics::new(&parts.registry);
    info!(
        sink = sink.name(),
        slack_platform = slack_platform.is_some(),
        matrix_platform = matrix_platform.is_some(),
        "responder posting replies"
    );
    let ctx = Arc::new(Context {
        queue: topology.replies_queue(),
        topology,
        prefetch: config.broker.prefetch,
        sink,
        slack_platform,
        matrix_platform,
        integrations: parts.integrations.clone(),
        pace: config.responder.per_channel,
        limiter: RateLimiter::new(),
        schedule: RetrySchedule::default(),
        limits: RetryLimits {
            max_attempts: config.responder.max_attempts,
            max_age: config.responder.max_age,
        },
        timeout: config.responder.timeout,
        metrics,
        log: parts.log.clone(),
        health: parts.health.clone(),
        shutdown: shutdown.clone(),
    });
    Ok(parts.run(&config, shutdown, move |connection| session(connection, ctx.clone())))
}

/// The bot token in force, from `[ingress.slack]`'s secrets.
fn bot_token(
    mut secrets: watch::Receiver<Arc<swallow_shared::config::SlackSecrets>>,
    shutdown: CancellationToken,
) -> watch::Receiver<Arc<str>> {
    let (tx, rx) = watch::channel(Arc::from(secrets.borrow_and_update().bot_token.as_str()));
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                changed = secrets.changed() => if changed.is_err() { return },
            }
            let token = Arc::from(secrets.borrow_and_update().bot_token.as_str());
            if tx.send(token).is_err() {
                return;
            }
        }
    });
    rx
}

struct Context {
    topology: Topology,
    queue: String,
    prefetch: u16,
    sink: ReplySink,
    /// Where replies to events from Slack's ingress go (`platform = "slack"`).
    slack_platform: Option<ReplySink>,
    /// Where replies to events from a Matrix homeserver go (`platform = "matrix"`).
    matrix_platform: Option<matrix::MatrixSink>,
    integrations: watch::Receiver<Arc<Integrations>>,
    pace: RateLimit,
    limiter: RateLimiter<(String, String)>,
    schedule: RetrySchedule,
    limits: RetryLimits,
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
    // Replies to `chat.outbound` may come back unroutable (no platform
    // bound for their channel): they go on a channel of their own, in
    // batches whose returns are matched to their publishes, so that a
    // return is never taken for another publish.
    let chat = Arc::new(MatchedReturns::start(connection.clone(), usize::from(ctx.prefetch)));
    consume(connection, options, |delivery, publisher, settler| {
        handle(delivery, ctx.clone(), publisher, settler, chat.clone())
    })
    .await
}

/// Applies the integration's identity, the answer's overrides and the thread.
pub fn outbound<'a>(reply: &'a ReplyJob, integration: Option<&'a Integration>) -> OutboundReply<'a> {
    let a = &reply.answer;
    let username = a
        .username
        .as_deref()
        .or_else(|| integration.map(|i| i.bot_name.as_str()))
        .unwrap_or(&reply.integration_id);
    // An icon in the answer replaces the integration's, whichever kind it is.
    let (icon_url, icon_emoji) = if a.icon_url.is_some() || a.icon_emoji.is_some() {
        (a.icon_url.as_deref(), a.icon_emoji.as_deref())
    } else {
        (
            integration.and_then(|i| i.icon_url.as_deref()),
            integration.and_then(|i| i.icon_emoji.as_deref()),
        )
    };
    // An explicit thread wins; "comment" threads under the triggering
    // message; a message that was already in a thread is answered there.
    let thread_ts = a
        .thread_ts
        .as_deref()
        .or(reply.event_thread_ts.as_deref())
        .or_else(|| (a.response_type.as_deref() == Some("comment")).then_some(reply.in_reply_to.as_str()));
    OutboundReply {
        team_id: &reply.team_id,
        channel_id: &reply.channel_id,
        thread_ts,
        text: &a.text,
        username,
        icon_url,
        icon_emoji,
        attachments: a.attachments.as_ref(),
        integration_id: &reply.integration_id,
        delivery_id: &reply.delivery_id,
        in_reply_to: &reply.in_reply_to,
        bot_id: BOT_ID,
        subtype: "bot_message",
    }
}

/// Handles one delivery of a reply, from its bytes to its ack.
///
/// An `async move` block, not an `async fn`, here and in `post`: an
/// `async fn` keeps each argument twice for as long as it runs (its own,
/// and the local it is moved into).
#[allow(clippy::manual_async_fn, reason = "an async fn keeps each argument twice")]
fn handle(
    delivery: Delivery,
    ctx: Arc<Context>,
    publisher: ConfirmedPublisher,
    settler: Settler,
    chat: Arc<MatchedReturns>,
) -> impl Future<Output = Result<(), SessionError>> + Send + 'static {
    async move {
        let settled = lifecycle::handle(
            &delivery,
            &settler,
            &publisher,
            &ctx.topology,
            |reply| lifecycle::slot_leeway(reply, Some(&ctx.pace)),
            |reply| decide(reply, &ctx, &chat),
            |opened| record_failure(&ctx, opened, None),
        )
        .await?;
        ctx.metrics.count(settled);
        Ok(())
    }
}

/// The responder's own part of a reply's life: its channel's pace, then
/// the post and what the sink's answer means.
fn decide<'a>(
    reply: ReplyJob,
    ctx: &'a Context,
    chat: &'a MatchedReturns,
) -> impl Future<Output = Disposition<ReplyJob>> + Send + 'a {
    match admit(reply, ctx) {
        ControlFlow::Continue(reply) => Either::Left(post(reply, ctx, chat)),
        ControlFlow::Break(settled) => {
            record_failure(ctx, &settled, None);
            Either::Right(std::future::ready(settled))
        }
    }
}

/// The delivery log's record of a reply that failed for good or waits for
/// a retry (a posted one is recorded where it is posted).
fn record_failure(ctx: &Context, disposition: &Disposition<ReplyJob>, took: Option<Duration>) {
    let (record, error) = match disposition {
        Disposition::Dead(DeadLetter {
            body: Ok(reply),
            detail,
            ..
        }) => (LogRecord::reply(Step::ReplyDead, reply), detail.as_str()),
        Disposition::Park {
            job,
            why: ParkReason::Retry,
            ..
        } => (
            LogRecord::reply(Step::ReplyRetried, job),
            job.retry.last_error.as_deref().unwrap_or(""),
        ),
        _ => return,
    };
    let record = match took {
        Some(took) => record.with_duration(took),
        None => record,
    };
    ctx.log.record(record.with_error(error));
}

/// Not too old, and paced per channel, so a chatty handler cannot flood it.
fn admit(reply: ReplyJob, ctx: &Context) -> Next<ReplyJob> {
    let now = now_millis();
    let (reply, deadline) = within_max_age(reply, ctx.limits.max_age, now)?;
    let key = (reply.team_id.clone(), reply.channel_id.clone());
    take_turn(reply, &ctx.limiter, &key, &ctx.pace, now, deadline)
}

#[allow(clippy::manual_async_fn, reason = "an async fn keeps each argument twice")]
fn post<'a>(
    mut reply: ReplyJob,
    ctx: &'a Context,
    chat: &'a MatchedReturns,
) -> impl Future<Output = Disposition<ReplyJob>> + Send + 'a {
    async move {
        let integrations = ctx.integrations.borrow().clone();
        let out = outbound(&reply, integrations.get(&reply.integration_id).map(|i| i.as_ref()));
        let started = Instant::now();
        let posted = match (reply.platform.as_deref(), &ctx.slack_platform, &ctx.matrix_platform) {
            (None, _, _) => ctx.sink.post(&out, chat, ctx.timeout).await,
            (Some("slack"), Some(slack), _) => slack.post(&out, chat, ctx.timeout).await,
            (Some("matrix"), _, Some(matrix)) => matrix.post(&out, ctx.timeout).await,
            (Some(platform), _, _) => Posted::Retry {
                error: format!(
                    "a reply for platform {platform:?}, which this responder's configuration has no [ingress.{platform}] for"
                ),
                retry_after: None,
            },
        };
        let took = started.elapsed();
        ctx.metrics.post_duration.observe(took.as_secs_f64());
        reply.retry.attempt += 1;
        let disposition = match posted {
            Posted::Ok => {
                if let Some(ts_ms) = swallow_shared::wire::event::ts_to_millis(&reply.in_reply_to) {
                    let latency = now_millis().saturating_sub(ts_ms);
                    ctx.metrics.end_to_end.observe(latency as f64 / 1000.0);
                }
                ctx.log
                    .record(LogRecord::reply(Step::ReplyPosted, &reply).with_duration(took));
                Disposition::Done
            }
            Posted::Rejected { error } => Disposition::dead(reply, DeadReason::Rejected, error),
            Posted::Retry { error, retry_after } => {
                let failure = Failure {
                    error,
                    retry_after,
                    status: None,
                };
                lifecycle::retry_or_dead(reply, &ctx.schedule, ctx.limits, failure)
            }
        };
        record_failure(ctx, &disposition, Some(took));
        disposition
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use swallow_shared::wire::messages::{HandlerAnswer, RetryState};

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
            platform: None,
            retry: RetryState::new(0),
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
        let job = reply(text("hi"), None);
        let plain = outbound(&job, Some(&i));
        assert_eq!(plain.username, "Google Bot");
        assert_eq!(plain.icon_emoji, Some(":bird:"));
        assert_eq!(plain.thread_ts, None);
        assert_eq!(plain.bot_id, BOT_ID);
        assert_eq!(plain.subtype, "bot_message");

        let custom = HandlerAnswer {
            username: Some("Tim".into()),
            icon_url: Some("http://x/i.png".into()),
            response_type: Some("comment".into()),
            ..text("hi")
        };
        let job = reply(custom, None);
        let o = outbound(&job, Some(&i));
        assert_eq!(o.username, "Tim");
        assert_eq!((o.icon_url, o.icon_emoji), (Some("http://x/i.png"), None));
        assert_eq!(o.thread_ts, Some("100.000001"), "comment threads under the trigger");

        let job = reply(text("hi"), Some("90.0"));
        assert_eq!(outbound(&job, Some(&i)).thread_ts, Some("90.0"));
        let explicit = HandlerAnswer {
            thread_ts: Some("80.0".into()),
            ..text("hi")
        };
        assert_eq!(
            outbound(&reply(explicit, Some("90.0")), Some(&i)).thread_ts,
            Some("80.0")
        );
        assert_eq!(outbound(&reply(text("hi"), None), None).username, "googlebot");
    }
}
