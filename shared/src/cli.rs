//! The command-line arguments every stage binary takes.

use std::path::PathBuf;

use tracing::info;

use crate::config::{Config, ConfigError, Stage};

#[derive(Debug, Clone, clap::Args)]
pub struct ConfigArgs {
    /// The swallow configuration file (TOML).
    #[arg(long, env = "SWALLOW_CONFIG", value_name = "FILE")]
    pub config: PathBuf,
}

/// `swallow-<stage> --config FILE`.
#[derive(Debug, clap::Parser)]
#[command(version, about)]
pub struct StageArgs {
    #[command(flatten)]
    pub config: ConfigArgs,
}

impl StageArgs {
    /// Starts logging, then reads, validates and applies the environment to the
    /// configuration for `stage`.
    pub fn load(&self, stage: Stage) -> Result<Config, ConfigError> {
        self.config.load(stage)
    }
}

impl ConfigArgs {
    pub fn load(&self, stage: Stage) -> Result<Config, ConfigError> {
        crate::shutdown::init_logging();
        let mut config = Config::load(&self.config)?;
        config.apply_env(stage)?;
        info!(
            stage = stage.name(),
            version = env!("CARGO_PKG_VERSION"),
            config = %self.config.display(),
            integrations = config.integrations.list.len(),
            broker = %config.broker.urls,
            prefix = %config.broker.prefix,
            "starting"
        );
        Ok(config)
    }
}

/// Prints one clear line for an error that stops a stage, and the exit code.
pub fn fail(program: &str, error: impl std::fmt::Display) -> std::process::ExitCode {
    eprintln!("{program}: error: {error}");
    std::process::ExitCode::from(2)
}
