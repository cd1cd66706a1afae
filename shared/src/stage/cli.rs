//! The command-line arguments every stage binary takes. Each binary
//! declares its own `clap::Parser` (so its `--help` and `--version` describe
//! that binary, not this library) and flattens [`ConfigArgs`] into it.

use std::fmt::Display;
use std::future::Future;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::{Config, ConfigError, LogFormat, Stage};
use crate::job::lifecycle::Job;

#[derive(Debug, Clone, clap::Args)]
pub struct ConfigArgs {
    /// The swallow configuration file (TOML).
    #[arg(long, env = "SWALLOW_CONFIG", value_name = "FILE")]
    pub config: PathBuf,
}

/// The options of a stage's `replay` command.
#[derive(Debug, Clone, clap::Args)]
pub struct ReplayArgs {
    /// Only jobs of this integration.
    #[arg(long)]
    pub integration: Option<String>,
    /// Move at most this many.
    #[arg(long)]
    pub limit: Option<usize>,
}

/// What every stage's `--help` says after its options: how to run it.
pub const RUNNING: &str = "\
Every stage reads the same configuration file (--config or SWALLOW_CONFIG).
The environment overrides it: AMQP_URL (the broker), SWALLOW_PREFIX (the
names of every exchange and queue), SWALLOW_HTTP_ADDR (/metrics, /healthz,
/readyz), RUST_LOG and SWALLOW_LOG_FORMAT (text or json). Run any number of
replicas against one broker; SIGTERM stops consuming and hands back or
finishes the work under way. An invalid file stops the stage at start with
one line naming the file, the integration and the field (exit status 2).";

impl ConfigArgs {
    /// Reads, validates and applies the environment to the configuration for
    /// `stage`, then starts logging in the format it gives and logs what it
    /// warns of. Says nothing else: a command (`log`, `replay`) is not the
    /// stage starting; [`serve`] says that.
    pub fn load(&self, stage: Stage) -> Result<Config, ConfigError> {
        let mut config = Config::load(&self.config)?;
        config.apply_env(stage)?;
        super::logging::init(stage.name(), config.log.format);
        for warning in &config.warnings {
            warn!(config = %self.config.display(), "{warning}");
        }
        Ok(config)
    }
}

/// A stage's whole `main`: loads the configuration for `stage`, then runs
/// the stage (`run(config, shutdown)`, shutdown on SIGTERM or SIGINT with
/// `grace` for the work under way) until it stops; the exit code, with one
/// line for an error that stopped it.
pub async fn run_stage<F, Fut, E>(program: &str, stage: Stage, args: &ConfigArgs, grace: Duration, run: F) -> ExitCode
where
    F: FnOnce(Config, CancellationToken) -> Fut,
    Fut: Future<Output = Result<(), E>>,
    E: Display,
{
    match args.load(stage) {
        Ok(config) => serve(program, config, grace, run).await,
        Err(e) => fail(program, e),
    }
}

/// A stage's `replay` command: moves its dead `J`s back into line
/// ([`crate::job::replay`]) and says what it did; `noun` is what a `J` is
/// called there ("job", "reply job").
pub async fn replay<J: Job>(program: &str, config: &Config, args: &ReplayArgs, noun: &str) -> ExitCode {
    let stage = program.strip_prefix("swallow-").unwrap_or(program);
    match crate::job::replay::replay::<J>(&config.broker, program, args.integration.as_deref(), args.limit).await {
        Ok(done) => {
            println!("{}", done.report(noun, stage));
            ExitCode::SUCCESS
        }
        Err(e) => fail(program, e),
    }
}

/// Runs a stage on a loaded configuration until it stops (see [`run_stage`]).
pub async fn serve<F, Fut, E>(program: &str, config: Config, grace: Duration, run: F) -> ExitCode
where
    F: FnOnce(Config, CancellationToken) -> Fut,
    Fut: Future<Output = Result<(), E>>,
    E: Display,
{
    info!(
        stage = program.strip_prefix("swallow-").unwrap_or(program),
        version = env!("CARGO_PKG_VERSION"),
        config = %config.path.as_deref().unwrap_or(std::path::Path::new("-")).display(),
        integrations = config.integrations.list.len(),
        broker = %config.broker.urls,
        prefix = %config.broker.prefix,
        "starting"
    );
    match run(config, super::shutdown::on_signal(grace)).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(program, e),
    }
}

/// Prints one clear line for an error that stops a stage (a JSON one when
/// logging is in JSON), and the exit code.
pub fn fail(program: &str, error: impl Display) -> ExitCode {
    match super::logging::format() {
        LogFormat::Text => eprintln!("{program}: error: {error}"),
        LogFormat::Json => eprintln!(
            "{}",
            super::logging::json_line(
                program.strip_prefix("swallow-").unwrap_or(program),
                "ERROR",
                &error.to_string()
            )
        ),
    }
    ExitCode::from(2)
}

/// A stage binary's allocator, expanded once in each stage's `main.rs`
/// (whose crate depends on `tikv-jemallocator`; not on MSVC): jemalloc
/// instead of glibc's malloc, 7 to 17% less CPU per message in the stages
/// and the same peak memory under load (BENCHMARKS.md, "The allocator"),
/// and jemalloc's settings, read when it starts (`_RJEM_MALLOC_CONF` in
/// the environment is applied after them): freed pages go back to the
/// system within about a second, from a background thread, so that what
/// parsing the configuration took at start and at each reload does not
/// stay resident (BENCHMARKS.md, "Where a stage's memory goes").
///
/// A stage built with its `system-allocator` feature keeps glibc's malloc
/// instead, for heap profilers that hook malloc (heaptrack:
/// `tests/bench/heap.sh`); releases do not use it.
#[macro_export]
macro_rules! stage_allocator {
    () => {
        #[cfg(not(any(target_env = "msvc", feature = "system-allocator")))]
        #[global_allocator]
        static ALLOCATOR: ::tikv_jemallocator::Jemalloc = ::tikv_jemallocator::Jemalloc;

        // jemalloc reads `const char *malloc_conf` (prefixed `_rjem_` by
        // tikv-jemalloc-sys): a NUL-terminated string.
        #[cfg(not(any(target_env = "msvc", feature = "system-allocator")))]
        #[unsafe(export_name = "_rjem_malloc_conf")]
        static MALLOC_CONF: &[u8; 43] = b"background_thread:true,dirty_decay_ms:1000\0";
    };
}
