//! `swallow-chat`: talk to swallow as a chat platform would.
//!
//! ```text
//! swallow-chat --config deploy/example.toml say "googlebot: what is your quest?" --channel test
//! swallow-chat --config deploy/example.toml listen
//! ```

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use futures_util::StreamExt;
use swallow_shared::{Config, Stage};
use swallow_tools::chat::{self, Say};

#[derive(Parser)]
#[command(version, about = "Publish chat messages to swallow and watch the replies")]
struct Args {
    /// swallow's configuration file, for the broker URL and prefix
    /// (`AMQP_URL` and `SWALLOW_PREFIX` override it; without it, the defaults).
    #[arg(long, env = "SWALLOW_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Publish a chat message to `<prefix>.events`.
    Say {
        text: String,
        /// The channel's name.
        #[arg(long, default_value = "test")]
        channel: String,
        /// The channel's id.
        #[arg(long, default_value = "C2147483705")]
        channel_id: String,
        #[arg(long, default_value = "T0001")]
        team: String,
        #[arg(long, default_value = "Steve")]
        user: String,
        /// Post into this thread.
        #[arg(long)]
        thread_ts: Option<String>,
    },
    /// Print replies as they arrive on `<prefix>.chat.outbound` (Ctrl-C stops).
    Listen,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut config = match &args.config {
        Some(path) => Config::load(path)?,
        None => Config::parse("", None)?,
    };
    config.apply_env(Stage::Matcher)?;
    let topology = config.broker.topology();
    let connection = swallow_shared::broker::connect(&config.broker, "swallow-chat").await?;
    match args.command {
        Command::Say {
            text,
            channel,
            channel_id,
            team,
            user,
            thread_ts,
        } => {
            let event = chat::say(
                &connection,
                &topology,
                &Say {
                    team_id: &team,
                    channel_id: &channel_id,
                    channel_name: &channel,
                    user_name: &user,
                    text: &text,
                    thread_ts: thread_ts.as_deref(),
                },
            )
            .await?;
            println!("#{channel} {user}: {text}  (ts {})", event["ts"].as_str().unwrap_or(""));
        }
        Command::Listen => {
            let mut replies = Box::pin(chat::listen(&connection, &topology).await?);
            // Replies carry the channel's id; the events said in it carry its
            // name, so replies are shown by name as the messages were.
            let mut events = Box::pin(chat::events(&connection, &topology).await?);
            let mut names = chat::ChannelNames::default();
            eprintln!(
                "listening for replies on {} (Ctrl-C stops)",
                topology.chat_outbound_exchange()
            );
            loop {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => break,
                    Some(event) = events.next() => names.learn(&event),
                    next = replies.next() => match next {
                        Some(reply) => println!("{}", names.show(&reply)),
                        None => anyhow::bail!("the broker closed the connection"),
                    },
                }
            }
        }
    }
    let _ = connection.close(200, "bye".into()).await;
    Ok(())
}
