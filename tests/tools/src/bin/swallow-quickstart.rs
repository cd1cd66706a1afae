//! `swallow-quickstart`: the README's first command (via
//! `deploy/quickstart.sh`). Starts googlebot and the three real stage
//! binaries on the example configuration, publishes the seed's message,
//! prints the POST googlebot received and the reply as it arrives in the
//! channel, then keeps running until Ctrl-C (or SIGTERM), which stops
//! everything it started: each stage with one SIGTERM, exiting 0.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use clap::Parser;
use futures_util::StreamExt;
use swallow_shared::{Config, Stage};
use swallow_tools::chat::{self, Say};
use swallow_tools::googlebot;

#[derive(Parser)]
#[command(version, about = "Run swallow end to end on this machine")]
struct Args {
    #[arg(long, default_value = "deploy/example.toml")]
    config: PathBuf,
    /// Where googlebot listens (the example configuration POSTs here).
    #[arg(long, default_value = "127.0.0.1:8088")]
    handler_addr: std::net::SocketAddr,
}

const SEED: &str = "googlebot: What is the air-speed velocity of an unladen swallow?";

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut config = Config::load(&args.config)?;
    config.apply_env(Stage::Matcher)?;
    let topology = config.broker.topology();
    let connection = swallow_shared::broker::connect(&config.broker, "swallow-quickstart")
        .await
        .map_err(|e| anyhow::anyhow!("cannot reach RabbitMQ: {e}"))?;

    let (tx, mut posts) = tokio::sync::mpsc::unbounded_channel();
    let bound = googlebot::serve(args.handler_addr, tx).await?;
    println!("googlebot (the example handler) is answering on http://{bound}/");

    let bin_dir = std::env::current_exe()?
        .parent()
        .map(Path::to_owned)
        .unwrap_or_default();
    let mut children = Vec::new();
    for (stage, addr) in [
        ("swallow-matcher", config.matcher.http_addr),
        ("swallow-deliverer", config.deliverer.http_addr),
        ("swallow-responder", config.responder.http_addr),
    ] {
        let child = tokio::process::Command::new(bin_dir.join(stage))
            .arg("--config")
            .arg(&args.config)
            .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()))
            .stdin(Stdio::null())
            // A process group of its own: a terminal's Ctrl-C (SIGINT to the
            // foreground group) reaches only the quick start, which then
            // stops each stage with one SIGTERM. Had the stages got the
            // SIGINT too, that SIGTERM would be their second signal, which
            // makes a stage exit at once with status 1.
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| {
                anyhow::anyhow!(
                    "starting {}: {e} (run `cargo build --release --workspace --bins` first)",
                    bin_dir.join(stage).display()
                )
            })?;
        children.push((stage, addr, child));
    }
    for (stage, addr, _) in &children {
        let url = format!("http://127.0.0.1:{}/readyz", addr.port());
        let ready = swallow_tools::wait_ready(&url, Duration::from_secs(30)).await;
        anyhow::ensure!(ready, "{stage} did not become ready on {url}");
        println!(
            "{stage} is running (metrics on http://127.0.0.1:{}/metrics)",
            addr.port()
        );
    }

    let mut replies = Box::pin(chat::listen(&connection, &topology).await?);
    let say = Say {
        team_id: "T0001",
        channel_id: "C2147483705",
        channel_name: "test",
        user_name: "Steve",
        text: SEED,
        thread_ts: None,
    };
    chat::say(&connection, &topology, &say).await?;
    println!("\n#{} {}: {SEED}", say.channel_name, say.user_name);

    let post = tokio::time::timeout(Duration::from_secs(30), posts.recv())
        .await
        .ok()
        .flatten()
        .ok_or_else(|| anyhow::anyhow!("googlebot received no POST within 30 s"))?;
    println!("\ngooglebot received a POST:");
    for (k, v) in &post.headers {
        println!("  {k}: {v}");
    }
    for (k, v) in &post.fields {
        println!("  {k}={v}");
    }
    let reply = tokio::time::timeout(Duration::from_secs(30), replies.next())
        .await
        .ok()
        .flatten()
        .ok_or_else(|| anyhow::anyhow!("no reply arrived within 30 s"))?;
    println!(
        "\nthe reply, as it arrived on {}:\n  {}",
        topology.chat_outbound_exchange(),
        chat::show_reply_in(&reply, &say)
    );

    let cfg = args.config.display();
    println!(
        "\nswallow is running. In another terminal:\n  \
         target/release/swallow-chat --config {cfg} say \"googlebot: what is your quest?\"\n  \
         target/release/swallow-chat --config {cfg} listen\n\
         Edit {cfg} to add integrations (reloaded on save). Ctrl-C stops everything.\n"
    );
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = terminate.recv() => break,
            Some(post) = posts.recv() => {
                let text = post.fields.iter().find(|(k, _)| k == "text").map(|(_, v)| v.as_str()).unwrap_or("");
                println!("googlebot received: {text}");
            }
            Some(reply) = replies.next() => println!("reply: {}", chat::show_reply_in(&reply, &say)),
        }
    }
    println!("stopping the stages…");
    let mut clean = true;
    for (stage, _, child) in &mut children {
        if let Some(pid) = child.id() {
            let _ = std::process::Command::new("kill")
                .arg("-TERM")
                .arg(pid.to_string())
                .status();
        }
        match tokio::time::timeout(Duration::from_secs(25), child.wait()).await {
            Ok(Ok(status)) => {
                clean &= status.success();
                println!("{stage} stopped ({status})");
            }
            _ => {
                clean = false;
                let _ = child.kill().await;
                println!("{stage} killed");
            }
        }
    }
    let _ = connection.close(200, "bye".into()).await;
    anyhow::ensure!(clean, "a stage did not stop cleanly (see above)");
    Ok(())
}
