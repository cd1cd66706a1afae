//! `swallow-matcher`: chat events in, delivery jobs out.

use std::process::ExitCode;

use clap::Parser;
use swallow_shared::cli::{ConfigArgs, RUNNING, fail};
use swallow_shared::config::Stage;

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

#[tokio::main]
async fn main() -> ExitCode {
    const NAME: &str = "swallow-matcher";
    let args = Args::parse();
    let config = match args.config.load(Stage::Matcher) {
        Ok(config) => config,
        Err(e) => return fail(NAME, e),
    };
    match swallow_matcher::run(
        config,
        swallow_shared::shutdown::on_signal(swallow_matcher::SHUTDOWN_GRACE),
    )
    .await
    {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(NAME, e),
    }
}
