//! `swallow-responder`: handler replies in, chat messages out.

use std::process::ExitCode;

use clap::Parser;
use swallow_shared::cli::{StageArgs, fail};
use swallow_shared::config::Stage;

#[tokio::main]
async fn main() -> ExitCode {
    let args = StageArgs::parse();
    let config = match args.load(Stage::Responder) {
        Ok(config) => config,
        Err(e) => return fail("swallow-responder", e),
    };
    match swallow_responder::run(
        config,
        swallow_shared::shutdown::on_signal(swallow_responder::SHUTDOWN_GRACE),
    )
    .await
    {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail("swallow-responder", e),
    }
}
