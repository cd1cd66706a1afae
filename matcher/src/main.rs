//! `swallow-matcher`: chat events in, delivery jobs out.

use std::process::ExitCode;

use clap::Parser;
use swallow_shared::config::Stage;
use swallow_shared::stage::cli::{ConfigArgs, RUNNING, run_stage};

/// swallow's matcher: reads chat events from <prefix>.events and, for every
/// integration an event triggers (its channel and/or trigger words), queues
/// one delivery job per handler URL.
///
/// Events that are not valid go to <prefix>.events.invalid with the reason.
/// Metrics and health on SWALLOW_HTTP_ADDR (default 0.0.0.0:9101).
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
        "swallow-matcher",
        Stage::Matcher,
        &args.config,
        swallow_matcher::SHUTDOWN_GRACE,
        swallow_matcher::run,
    )
    .await
}
