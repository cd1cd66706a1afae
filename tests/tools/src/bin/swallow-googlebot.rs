//! `swallow-googlebot`: the seed's example handler on its own.
//! `swallow-googlebot --addr 127.0.0.1:8088`

use std::net::SocketAddr;

use clap::Parser;

#[derive(Parser)]
#[command(version, about = "The seed's example outgoing-webhook handler")]
struct Args {
    #[arg(long, default_value = "127.0.0.1:8088")]
    addr: SocketAddr,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let bound = swallow_tools::googlebot::serve(args.addr, tx).await?;
    eprintln!("googlebot answering POSTs on http://{bound}/");
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => return Ok(()),
            Some(post) = rx.recv() => {
                println!("googlebot received a POST:");
                for (k, v) in post.headers.iter().chain(post.fields.iter()) {
                    println!("  {k}: {v}");
                }
            }
        }
    }
}
