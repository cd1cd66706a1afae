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
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(clap::Subcommand)]
enum Command {
    /// Prints the registration file a Matrix homeserver loads to make this
    /// ingress its application service ([ingress.matrix]), and exits.
    MatrixRegistration {
        /// The ingress's URL as the homeserver reaches it (else
        /// [ingress.matrix] registration_url).
        #[arg(long, value_name = "URL")]
        url: Option<url::Url>,
    },
}

/// `matrix-registration`: the YAML on stdout, or one line on what is missing.
fn matrix_registration(args: &ConfigArgs, url: Option<url::Url>) -> ExitCode {
    let config = match swallow_shared::Config::load(&args.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("swallow-matcher: {e}");
            return ExitCode::from(2);
        }
    };
    let Some(matrix) = config.ingress.as_ref().and_then(|i| i.matrix.as_ref()) else {
        eprintln!("swallow-matcher: {}: no [ingress.matrix] table", args.config.display());
        return ExitCode::from(2);
    };
    let Some(url) = url.or_else(|| matrix.registration_url.clone()) else {
        eprintln!(
            "swallow-matcher: the ingress's URL as the homeserver reaches it: give --url or [ingress.matrix] registration_url"
        );
        return ExitCode::from(2);
    };
    print!(
        "{}",
        swallow_matcher::ingress::matrix::registration_yaml(matrix, &matrix.secrets, &url)
    );
    ExitCode::SUCCESS
}

swallow_shared::stage_allocator!();

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    if let Some(Command::MatrixRegistration { url }) = args.command {
        return matrix_registration(&args.config, url);
    }
    run_stage(
        "swallow-matcher",
        Stage::Matcher,
        &args.config,
        swallow_matcher::SHUTDOWN_GRACE,
        swallow_matcher::run,
    )
    .await
}
