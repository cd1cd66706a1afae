//! `swallow-deliverer`: delivery jobs in, HTTP POSTs out, replies onward.
//! `swallow-deliverer replay` moves dead jobs back into line.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use swallow_shared::cli::{ConfigArgs, RUNNING, fail};
use swallow_shared::config::Stage;

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
    Replay {
        /// Only jobs of this integration.
        #[arg(long)]
        integration: Option<String>,
        /// Move at most this many.
        #[arg(long)]
        limit: Option<usize>,
    },
}

#[tokio::main]
async fn main() -> ExitCode {
    const NAME: &str = "swallow-deliverer";
    let args = Args::parse();
    let config = match args.config.load(Stage::Deliverer) {
        Ok(config) => config,
        Err(e) => return fail(NAME, e),
    };
    match args.command {
        None => match swallow_deliverer::run(
            config,
            swallow_shared::shutdown::on_signal(swallow_deliverer::SHUTDOWN_GRACE),
        )
        .await
        {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(NAME, e),
        },
        Some(Command::Replay { integration, limit }) => {
            match swallow_deliverer::replay::replay(&config, integration.as_deref(), limit).await {
                Ok(done) => {
                    println!(
                        "moved {} dead job(s) back into line; left {} in {}.deliveries.dead",
                        done.moved, done.left, config.broker.prefix
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => fail(NAME, e),
            }
        }
    }
}
