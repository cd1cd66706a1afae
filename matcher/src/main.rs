//! `swallow-matcher`: chat events in, delivery jobs out.

use std::process::ExitCode;

use clap::Parser;
use swallow_shared::cli::{StageArgs, fail};
use swallow_shared::config::Stage;

#[tokio::main]
async fn main() -> ExitCode {
    let args = StageArgs::parse();
    let config = match args.load(Stage::Matcher) {
        Ok(config) => config,
        Err(e) => return fail("swallow-matcher", e),
    };
    match swallow_matcher::run(
        config,
        swallow_shared::shutdown::on_signal(swallow_matcher::SHUTDOWN_GRACE),
    )
    .await
    {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail("swallow-matcher", e),
    }
}
