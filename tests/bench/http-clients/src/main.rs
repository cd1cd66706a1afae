//! The deliverer's HTTP client against the alternatives considered:
//! memory per request under way, and CPU per request.
//!
//! Each client runs in a process of its own (so one's heap does not count
//! against another's), against one loopback server in a further process that
//! speaks HTTP/1.1 and HTTP/2 without TLS (h2c, prior knowledge):
//!
//! 1. **memory**: `--requests` POSTs (a 400-byte form body, as a delivery)
//!    started at once; the server holds every one until all have arrived,
//!    then answers them all. The figure is the client's peak RSS (`VmHWM`)
//!    less its RSS before, per request.
//! 2. **cpu**: `--cpu-requests` POSTs, `--cpu-concurrency` at a time, each
//!    answered at once; the client's user + system CPU per request.
//!
//! `cargo run --release -- --rounds 3` (in this directory; it is not a
//! workspace member, so `cargo test --workspace` skips it).

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use bytes::Bytes;
use clap::{Parser, Subcommand};
use http_body_util::{BodyExt as _, Full};
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};

#[derive(Parser)]
struct Args {
    #[command(subcommand)]
    role: Option<Role>,
    /// Requests under way at once in the memory step.
    #[arg(long, default_value_t = 10_000)]
    requests: usize,
    /// Requests in the CPU step.
    #[arg(long, default_value_t = 50_000)]
    cpu_requests: usize,
    #[arg(long, default_value_t = 64)]
    cpu_concurrency: usize,
    /// Runs of each client, alternating.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Clients to run (default: all).
    #[arg(long, value_delimiter = ',')]
    clients: Vec<String>,
}

#[derive(Subcommand)]
enum Role {
    Server {
        #[arg(long)]
        port: u16,
        #[arg(long)]
        hold: usize,
    },
    Client {
        #[arg(long)]
        kind: String,
        #[arg(long)]
        port: u16,
        #[arg(long)]
        requests: usize,
        #[arg(long)]
        cpu_requests: usize,
        #[arg(long)]
        cpu_concurrency: usize,
    },
}

const CLIENTS: &[(&str, &str)] = &[
    ("reqwest-h1", "reqwest as the deliverer builds it (HTTP/1.1)"),
    ("hyper-h1", "hyper-util's client, HTTP/1.1, default buffers"),
    (
        "hyper-h1-exact4k",
        "hyper-util's client, HTTP/1.1, read buffer exactly 4 KiB",
    ),
    ("reqwest-h2c", "reqwest, HTTP/2 with prior knowledge"),
    ("hyper-h2c", "hyper-util's client, HTTP/2 with prior knowledge"),
    (
        "conn-h2c",
        "hyper's HTTP/2 connection without hyper-util's pool (`client::conn::http2`), prior knowledge",
    ),
];

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let rt = tokio::runtime::Runtime::new()?;
    match args.role {
        Some(Role::Server { port, hold }) => rt.block_on(server(port, hold)),
        Some(Role::Client {
            ref kind,
            port,
            requests,
            cpu_requests,
            cpu_concurrency,
        }) => rt.block_on(client(kind, port, requests, cpu_requests, cpu_concurrency)),
        None => orchestrate(&args),
    }
}

/// Starts the server, runs each client `rounds` times alternately, prints medians.
fn orchestrate(args: &Args) -> anyhow::Result<()> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let exe = std::env::current_exe()?;
    let mut server = std::process::Command::new(&exe)
        .args([
            "server",
            "--port",
            &port.to_string(),
            "--hold",
            &args.requests.to_string(),
        ])
        .stdout(std::process::Stdio::null())
        .spawn()?;
    let outcome = compare(args, &exe, port);
    let _ = server.kill();
    let _ = server.wait();
    outcome
}

fn compare(args: &Args, exe: &std::path::Path, port: u16) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        anyhow::ensure!(Instant::now() < deadline, "the server did not listen within 10 s");
        std::thread::sleep(Duration::from_millis(20));
    }
    let chosen: Vec<&(&str, &str)> = CLIENTS
        .iter()
        .filter(|(k, _)| args.clients.is_empty() || args.clients.iter().any(|c| c == k))
        .collect();
    let mut results: BTreeMap<&str, Vec<(f64, f64, f64)>> = BTreeMap::new();
    let mut failures: BTreeMap<&str, usize> = BTreeMap::new();
    for round in 1..=args.rounds {
        for (kind, _) in &chosen {
            let out = std::process::Command::new(exe)
                .args(["client", "--kind", kind, "--port", &port.to_string()])
                .args(["--requests", &args.requests.to_string()])
                .args(["--cpu-requests", &args.cpu_requests.to_string()])
                .args(["--cpu-concurrency", &args.cpu_concurrency.to_string()])
                .output()?;
            let text = String::from_utf8_lossy(&out.stdout);
            if !out.status.success() {
                let why = String::from_utf8_lossy(&out.stderr);
                println!(
                    "round {round} {kind:18} failed: {}",
                    why.split_whitespace().collect::<Vec<_>>().join(" ")
                );
                failures.entry(kind).and_modify(|n| *n += 1).or_insert(1);
                continue;
            }
            let v: Vec<f64> = text.split_whitespace().map(|x| x.parse().unwrap_or(f64::NAN)).collect();
            println!(
                "round {round} {kind:18} {:6.1} KiB/request  peak RSS {:6.1} MiB  {:6.1} µs CPU/request",
                v[0], v[1], v[2]
            );
            results.entry(kind).or_default().push((v[0], v[1], v[2]));
        }
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    println!(
        "\n| client | KiB per request under way | peak RSS, {} under way (MiB) | µs CPU per request | runs failed |",
        args.requests
    );
    println!("|---|---:|---:|---:|---:|");
    for (kind, what) in &chosen {
        let failed = failures.get(kind).copied().unwrap_or(0);
        let Some(r) = results.get(kind) else {
            println!("| {what} | – | – | – | {failed} |");
            continue;
        };
        println!(
            "| {what} | {:.1} | {:.1} | {:.1} | {failed} |",
            median(r.iter().map(|x| x.0).collect()),
            median(r.iter().map(|x| x.1).collect()),
            median(r.iter().map(|x| x.2).collect()),
        );
    }
    Ok(())
}

/// Answers `/hold` once `hold` of them are waiting (or after 30 s), anything else at once.
async fn server(port: u16, hold: usize) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
    let waiting = Arc::new(AtomicUsize::new(0));
    let (release, released) = tokio::sync::watch::channel(0u64);
    let release = Arc::new(release);
    loop {
        let (stream, _) = listener.accept().await?;
        let (waiting, release, released) = (waiting.clone(), release.clone(), released.clone());
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                let (waiting, release, mut released) = (waiting.clone(), release.clone(), released.clone());
                async move {
                    let hold_it = req.uri().path() == "/hold";
                    let _ = req.into_body().collect().await;
                    if hold_it {
                        let generation = *released.borrow_and_update();
                        if waiting.fetch_add(1, Ordering::SeqCst) + 1 >= hold {
                            waiting.store(0, Ordering::SeqCst);
                            release.send_modify(|g| *g += 1);
                        } else {
                            let _ =
                                tokio::time::timeout(Duration::from_secs(30), released.wait_for(|g| *g != generation))
                                    .await;
                        }
                    }
                    Ok::<_, Infallible>(
                        hyper::Response::builder()
                            .header("content-type", "application/json")
                            .body(Full::new(Bytes::from_static(br#"{"text":"ok"}"#)))
                            .expect("a valid response"),
                    )
                }
            });
            let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            builder.http2().max_concurrent_streams(100_000);
            let _ = builder.serve_connection(TokioIo::new(stream), service).await;
        });
    }
}

enum Http {
    Reqwest(reqwest::Client),
    Hyper(Box<HyperClient<HttpConnector, Full<Bytes>>>),
    /// One HTTP/2 connection's sender, shared: no pool, no boxed request future.
    Conn(hyper::client::conn::http2::SendRequest<Full<Bytes>>),
}

impl Http {
    async fn new(kind: &str, port: u16) -> anyhow::Result<Http> {
        let reqwest_builder = || {
            reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .no_proxy()
                .pool_idle_timeout(Duration::from_secs(60))
                .pool_max_idle_per_host(64)
                .tcp_nodelay(true)
        };
        let hyper_builder = || {
            let mut b = HyperClient::builder(TokioExecutor::new());
            b.pool_idle_timeout(Duration::from_secs(60)).pool_max_idle_per_host(64);
            b
        };
        let connector = || {
            let mut c = HttpConnector::new();
            c.set_nodelay(true);
            c
        };
        Ok(match kind {
            "reqwest-h1" => Http::Reqwest(reqwest_builder().build()?),
            "reqwest-h2c" => Http::Reqwest(reqwest_builder().http2_prior_knowledge().build()?),
            "hyper-h1" => Http::Hyper(Box::new(hyper_builder().build(connector()))),
            "hyper-h1-exact4k" => Http::Hyper(Box::new(
                hyper_builder().http1_read_buf_exact_size(4096).build(connector()),
            )),
            "hyper-h2c" => Http::Hyper(Box::new(hyper_builder().http2_only(true).build(connector()))),
            "conn-h2c" => {
                let stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
                stream.set_nodelay(true)?;
                let (sender, connection) =
                    hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream)).await?;
                tokio::spawn(connection);
                Http::Conn(sender)
            }
            other => anyhow::bail!("unknown client {other}"),
        })
    }

    /// One POST of a delivery-sized form body; the answer's bytes.
    async fn post(&self, url: &str, body: &'static [u8]) -> anyhow::Result<usize> {
        match self {
            Http::Reqwest(c) => {
                let response = c
                    .post(url)
                    .timeout(Duration::from_secs(60))
                    .header("content-type", "application/x-www-form-urlencoded")
                    .body(body)
                    .send()
                    .await?;
                anyhow::ensure!(response.status().is_success(), "HTTP {}", response.status());
                Ok(response.bytes().await?.len())
            }
            Http::Hyper(c) => {
                let request = hyper::Request::post(url)
                    .header("content-type", "application/x-www-form-urlencoded")
                    .body(Full::new(Bytes::from_static(body)))?;
                let response = tokio::time::timeout(Duration::from_secs(60), c.request(request))
                    .await
                    .context("timed out")??;
                anyhow::ensure!(response.status().is_success(), "HTTP {}", response.status());
                Ok(response.into_body().collect().await?.to_bytes().len())
            }
            Http::Conn(sender) => {
                let request = hyper::Request::post(url)
                    .header("content-type", "application/x-www-form-urlencoded")
                    .body(Full::new(Bytes::from_static(body)))?;
                let response = tokio::time::timeout(Duration::from_secs(60), sender.clone().send_request(request))
                    .await
                    .context("timed out")??;
                anyhow::ensure!(response.status().is_success(), "HTTP {}", response.status());
                Ok(response.into_body().collect().await?.to_bytes().len())
            }
        }
    }
}

fn status_kib(field: &str) -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(f64::NAN)
}

/// This process's user + system CPU seconds so far.
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let fields: Vec<&str> = stat.rsplit(')').next().unwrap_or("").split_whitespace().collect();
    let ticks = |i: usize| fields.get(i - 3).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(14) + ticks(15)) / 100.0
}

const BODY: &[u8] = &[b'x'; 400];

async fn client(kind: &str, port: u16, requests: usize, cpu_requests: usize, concurrency: usize) -> anyhow::Result<()> {
    let http = Arc::new(Http::new(kind, port).await?);
    let base = format!("http://127.0.0.1:{port}");
    http.post(&format!("{base}/"), BODY).await?;
    let before = status_kib("VmRSS:");
    let hold = Arc::new(format!("{base}/hold"));
    let tasks: Vec<_> = (0..requests)
        .map(|_| {
            let (http, hold) = (http.clone(), hold.clone());
            tokio::spawn(async move { http.post(&hold, BODY).await })
        })
        .collect();
    for t in tasks {
        t.await??;
    }
    let peak = status_kib("VmHWM:");
    let per_request = (peak - before) / requests as f64;

    let next = Arc::new(AtomicUsize::new(0));
    let url = Arc::new(format!("{base}/"));
    let cpu_before = cpu_seconds();
    let workers: Vec<_> = (0..concurrency)
        .map(|_| {
            let (http, url, next) = (http.clone(), url.clone(), next.clone());
            tokio::spawn(async move {
                while next.fetch_add(1, Ordering::Relaxed) < cpu_requests {
                    http.post(&url, BODY).await?;
                }
                anyhow::Ok(())
            })
        })
        .collect();
    for w in workers {
        w.await??;
    }
    let cpu = (cpu_seconds() - cpu_before) / cpu_requests as f64 * 1e6;
    println!("{per_request:.2} {:.2} {cpu:.2}", peak / 1024.0);
    Ok(())
}
