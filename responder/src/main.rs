//! `swallow-responder`: handler replies in, chat messages out.

use std::process::ExitCode;

use clap::Parser;
use swallow_shared::config::Stage;
use swallow_shared::stage::cli::{ConfigArgs, RUNNING, run_stage};

/// swallow's responder: posts the replies of webhook handlers back into their
/// channels, through the sink of [responder] sink: the <prefix>.chat.outbound
/// exchange (amqp), Slack's Web API (slack) or an incoming webhook (webhook).
///
/// Replies are paced per channel and retried; those that cannot be posted go
/// to <prefix>.replies.dead. Metrics and health on SWALLOW_HTTP_ADDR (default
/// 0.0.0.0:9103).
#[derive(Parser)]
#[command(version, after_long_help = RUNNING)]
struct Args {
    #[command(flatten)]
    config: ConfigArgs,
}

swallow_shared::stage_allocator!();

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    run_stage(
        "swallow-responder",
        Stage::Responder,
        &args.config,
        swallow_responder::SHUTDOWN_GRACE,
        swallow_responder::run,
    )
    .await
}
