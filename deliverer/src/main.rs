//! `swallow-deliverer`: delivery jobs in, HTTP POSTs out, replies onward.
//! `swallow-deliverer replay` moves dead jobs back into line;
//! `swallow-deliverer log` prints the delivery log.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use swallow_deliverer::log_command;
use swallow_shared::config::Stage;
use swallow_shared::stage::cli::{ConfigArgs, RUNNING, ReplayArgs, fail, replay, serve};
use swallow_shared::wire::messages::DeliveryJob;
use tokio_util::sync::CancellationToken;

/// swallow's deliverer: POSTs each delivery job to its handler URL, retries
/// failures on a durable delay ladder, keeps every integration's rate limit,
/// and passes the handlers' answers on to the responder.
///
/// Each replica owns some of the delivery shards at a time; jobs that cannot
/// be delivered go to <prefix>.deliveries.dead (see `replay`). Metrics and
/// health on SWALLOW_HTTP_ADDR (default 0.0.0.0:9102).
#[derive(Parser)]
#[command(version, after_long_help = RUNNING)]
struct Args {
    #[command(flatten)]
    config: ConfigArgs,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Move dead-lettered jobs back into the delivery queue.
    Replay(ReplayArgs),
    /// Print the delivery log: every step of matched messages, oldest first.
    Log {
        /// Start this long ago (e.g. 90s, 10m, 2h, 7d). Default 10m.
        #[arg(long, value_name = "DURATION", conflicts_with = "from")]
        since: Option<String>,
        /// Start at this time (RFC 3339, e.g. 2026-11-28T04:00:00Z).
        #[arg(long, value_name = "TIME")]
        from: Option<String>,
        /// Only records of this integration.
        #[arg(long, value_name = "ID")]
        integration: Option<String>,
        /// Only records of this delivery (the POST's webhook-id).
        #[arg(long, value_name = "ID")]
        delivery: Option<String>,
        /// Only records of the chat message with this ts.
        #[arg(long, value_name = "TS")]
        event: Option<String>,
        /// Only records of this channel id.
        #[arg(long, value_name = "ID")]
        channel: Option<String>,
        /// Keep printing new records until Ctrl-C.
        #[arg(long)]
        follow: bool,
        /// One JSON object per line instead of a table.
        #[arg(long)]
        json: bool,
    },
}

swallow_shared::stage_allocator!();

#[tokio::main]
async fn main() -> ExitCode {
    const NAME: &str = "swallow-deliverer";
    let args = Args::parse();
    // A bad time is refused before anything else is done.
    let query = match &args.command {
        Some(Command::Log {
            since,
            from,
            integration,
            delivery,
            event,
            channel,
            follow,
            json,
        }) => match log_command::start_time(since.as_deref(), from.as_deref(), jiff::Timestamp::now()) {
            Ok(from) => Some(log_command::LogQuery {
                from,
                filters: log_command::Filters {
                    integration: integration.clone(),
                    delivery: delivery.clone(),
                    event: event.clone(),
                    channel: channel.clone(),
                },
                follow: *follow,
                json: *json,
            }),
            Err(e) => return fail(NAME, e),
        },
        _ => None,
    };
    let config = match args.config.load(Stage::Deliverer) {
        Ok(config) => config,
        Err(e) => return fail(NAME, e),
    };
    match args.command {
        None => serve(NAME, config, swallow_deliverer::SHUTDOWN_GRACE, swallow_deliverer::run).await,
        Some(Command::Replay(replay_args)) => replay::<DeliveryJob>(NAME, &config, &replay_args, "job").await,
        Some(Command::Log { .. }) => {
            let query = query.expect("made above for the log command");
            let stop = CancellationToken::new();
            let on_ctrl_c = stop.clone();
            tokio::spawn(async move {
                let _ = tokio::signal::ctrl_c().await;
                on_ctrl_c.cancel();
            });
            let mut out = std::io::stdout().lock();
            match log_command::run(&config, &query, &mut out, stop).await {
                Ok(_) => ExitCode::SUCCESS,
                Err(e) => fail(NAME, e),
            }
        }
    }
}
