//! `swallow-quickstart`: the README's first command (via
//! `deploy/quickstart.sh`). Starts googlebot and the three real stage
//! binaries on the example configuration, publishes the seed's message,
//! prints the POST googlebot received and the reply as it arrives in the
//! channel, then keeps running until Ctrl-C, which stops everything it
//! started.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use clap::Parser;
use futures_util::StreamExt;
use swallow_shared::{Config, Stage};
use swallow_tests::chat::{self, Say};
use swallow_tests::googlebot;

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
    let connection = swallow_shared::broker::connect(&config.broker.url, "swallow-quickstart")
        .await
        .map_err(|e| {
            anyhow::anyhow!(
                "cannot reach RabbitMQ at {}: {e}",
                swallow_shared::broker::redact(&config.broker.url)
            )
        })?;

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
        let ready = swallow_tests::wait_ready(&url, Duration::from_secs(30)).await;
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
    println!("\n#test Steve: {SEED}");

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
        chat::show_reply(&reply)
    );

    let cfg = args.config.display();
    println!(
        "\nswallow is running. In another terminal:\n  \
         target/release/swallow-chat --config {cfg} say \"googlebot: what is your quest?\"\n  \
         target/release/swallow-chat --config {cfg} listen\n\
         Edit {cfg} to add integrations (reloaded on save). Ctrl-C stops everything.\n"
    );
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            Some(post) = posts.recv() => {
                let text = post.fields.iter().find(|(k, _)| k == "text").map(|(_, v)| v.as_str()).unwrap_or("");
                println!("googlebot received: {text}");
            }
            Some(reply) = replies.next() => println!("reply: {}", chat::show_reply(&reply)),
        }
    }
    println!("stopping the stages…");
    for (stage, _, child) in &mut children {
        if let Some(pid) = child.id() {
            let _ = std::process::Command::new("kill")
                .arg("-TERM")
                .arg(pid.to_string())
                .status();
        }
        match tokio::time::timeout(Duration::from_secs(25), child.wait()).await {
            Ok(Ok(status)) => println!("{stage} stopped ({status})"),
            _ => {
                let _ = child.kill().await;
                println!("{stage} killed");
            }
        }
    }
    let _ = connection.close(200, "bye".into()).await;
    Ok(())
}
