//! `swallow-responder`: handler replies in, chat messages out.
//! `swallow-responder replay` moves dead replies back into line.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use swallow_shared::config::Stage;
use swallow_shared::stage::cli::{ConfigArgs, RUNNING, ReplayArgs, fail, replay, serve};
use swallow_shared::wire::messages::ReplyJob;

/// swallow's responder: posts the replies of webhook handlers back into their
/// channels, through the sink of [responder] sink: the <prefix>.chat.outbound
/// exchange (amqp), Slack's Web API (slack) or an incoming webhook (webhook).
///
/// Replies are paced per channel and retried; those that cannot be posted go
/// to <prefix>.replies.dead (see `replay`). Metrics and health on
/// SWALLOW_HTTP_ADDR (default 0.0.0.0:9103).
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
    /// Move dead-lettered replies back into the replies queue.
    Replay(ReplayArgs),
}

swallow_shared::stage_allocator!();

#[tokio::main]
async fn main() -> ExitCode {
    const NAME: &str = "swallow-responder";
    let args = Args::parse();
    let config = match args.config.load(Stage::Responder) {
        Ok(config) => config,
        Err(e) => return fail(NAME, e),
    };
    match args.command {
        None => serve(NAME, config, swallow_responder::SHUTDOWN_GRACE, swallow_responder::run).await,
        Some(Command::Replay(replay_args)) => replay::<ReplyJob>(NAME, &config, &replay_args, "reply job").await,
    }
}
