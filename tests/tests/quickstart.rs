//! The quick start as a terminal runs it: in a process group of its own in
//! the foreground, where Ctrl-C is SIGINT to the whole group. It must stop
//! every stage cleanly (each exits 0, none reports a second signal) and exit
//! 0 itself; and it shows the seed's message and the reply in the same
//! channel the same way.

use std::process::Stdio;
use std::time::Duration;

use swallow_tests::*;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctrl_c_in_a_terminal_stops_every_stage_cleanly() {
    let stack = TestStack::new("quickstart").await.unwrap();
    let example = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/example.toml")).unwrap();
    // The shipped configuration, on this test's prefix and free ports.
    let handler = free_addr().to_string();
    let mut text = example.clone();
    for (from, to) in [
        (
            "url = \"amqp://guest:guest@127.0.0.1:5672/%2f\"",
            format!("url = \"{}\"", stack.url),
        ),
        ("prefix = \"swallow\"", format!("prefix = \"{}\"", stack.prefix)),
        ("127.0.0.1:9101", free_addr().to_string()),
        ("127.0.0.1:9102", free_addr().to_string()),
        ("127.0.0.1:9103", free_addr().to_string()),
        ("http://127.0.0.1:8088/", format!("http://{handler}/")),
    ] {
        assert_eq!(text.matches(from).count(), 1, "deploy/example.toml has {from} once");
        text = text.replace(from, &to);
    }
    let dir = TempDir::new("quickstart");
    let path = write_config(&dir, &text);

    let mut quickstart = tokio::process::Command::new(bin_path("swallow-quickstart"))
        .arg("--config")
        .arg(&path)
        .arg("--handler-addr")
        .arg(&handler)
        .env_remove("AMQP_URL")
        .env_remove("SWALLOW_PREFIX")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let group = quickstart.id().unwrap();
    let mut stdout = BufReader::new(quickstart.stdout.take().unwrap()).lines();
    let mut stderr = quickstart.stderr.take().unwrap();
    let mut shown = Vec::new();
    let running = tokio::time::timeout(Duration::from_secs(90), async {
        while let Some(line) = stdout.next_line().await.unwrap() {
            let done = line.starts_with("swallow is running");
            shown.push(line);
            if done {
                return;
            }
        }
        panic!("the quick start ended early");
    })
    .await;
    let mut err = String::new();
    if running.is_err() {
        let _ = quickstart.start_kill();
        let _ = tokio::time::timeout(Duration::from_secs(5), stderr.read_to_string(&mut err)).await;
        panic!(
            "the quick start did not say it runs within 90 s:\n{}\n{err}",
            shown.join("\n")
        );
    }
    let message = "#test Steve: googlebot: What is the air-speed velocity of an unladen swallow?";
    let reply = "#test googlebot: African or European?";
    for want in [message, reply] {
        assert!(
            shown.iter().any(|l| l.trim() == want),
            "the quick start shows {want:?}:\n{}",
            shown.join("\n")
        );
    }

    // Ctrl-C: SIGINT to the foreground process group.
    let status = std::process::Command::new("kill")
        .args(["-INT", "--", &format!("-{group}")])
        .status()
        .unwrap();
    assert!(status.success(), "kill -INT -{group}");
    let exit = tokio::time::timeout(Duration::from_secs(60), quickstart.wait())
        .await
        .expect("the quick start exits within 60 s of Ctrl-C")
        .unwrap();
    while let Some(line) = stdout.next_line().await.unwrap() {
        shown.push(line);
    }
    stderr.read_to_string(&mut err).await.unwrap();
    let out = shown.join("\n");
    for stage in ["swallow-matcher", "swallow-deliverer", "swallow-responder"] {
        assert!(
            out.contains(&format!("{stage} stopped (exit status: 0)")),
            "{stage} exits 0 on Ctrl-C:\n{out}\n{err}"
        );
    }
    assert!(!err.contains("second"), "a stage saw a second signal:\n{err}");
    assert!(
        exit.success(),
        "the quick start exits 0 on Ctrl-C ({exit}):\n{out}\n{err}"
    );
}
