//! A real Synapse homeserver for the Matrix tests: found in a virtualenv
//! (`$SWALLOW_SYNAPSE_VENV`, else `target/synapse-venv`, which `.ci/run`
//! creates), configured in a temporary directory (its own port on
//! 127.0.0.1, SQLite, swallow's registration file, no open registration,
//! rate limits out of the way of the test users), started in a process
//! group of its own and killed with it when dropped; users registered with
//! the shared secret, and a small client-server API client for them.
//!
//! Under `CI=true` a missing Synapse fails the test; elsewhere the test
//! says SKIPPED on stderr and returns.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use serde_json::{Value, json};

/// The server name every test homeserver has.
pub const SERVER_NAME: &str = "localhost";
/// How long Synapse may take to answer `/_matrix/client/versions`.
const START_BOUND: Duration = Duration::from_secs(60);

/// The virtualenv holding Synapse, when there is one.
pub fn venv() -> Option<PathBuf> {
    let candidates = [
        std::env::var_os("SWALLOW_SYNAPSE_VENV").map(PathBuf::from),
        std::env::var_os("CARGO_TARGET_DIR").map(|t| PathBuf::from(t).join("synapse-venv")),
        Some(Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/synapse-venv")),
    ];
    candidates
        .into_iter()
        .flatten()
        .find(|v| v.join("bin/python").exists() && v.join("bin/register_new_matrix_user").exists())
}

/// The venv, or `None` after saying SKIPPED (a failure under `CI=true`).
pub fn venv_or_skip() -> Option<PathBuf> {
    if let Some(v) = venv() {
        return Some(v);
    }
    let how = "python3 -m venv target/synapse-venv && target/synapse-venv/bin/pip install matrix-synapse \
               (or point SWALLOW_SYNAPSE_VENV at one)";
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("Synapse is missing on CI: {how}; .ci/run installs it");
    }
    let test = std::thread::current().name().unwrap_or("a test").to_owned();
    let line = format!("SKIPPED: {test} needs Synapse: {how}\n");
    let _ = std::io::Write::write_all(&mut std::io::stderr(), line.as_bytes());
    None
}

/// A running homeserver; killed (its whole process group) when dropped.
pub struct Synapse {
    pub base: String,
    dir: PathBuf,
    venv: PathBuf,
    child: std::process::Child,
}

impl Synapse {
    /// Generates a configuration in `dir` that loads `registration` (an
    /// application service's file), starts Synapse and waits until it answers.
    pub async fn start(venv: &Path, dir: &Path, registration: &Path) -> anyhow::Result<Synapse> {
        let port = crate::free_addr().port();
        let config = dir.join("homeserver.yaml");
        let python = venv.join("bin/python");
        let status = std::process::Command::new(&python)
            .args([
                "-m",
                "synapse.app.homeserver",
                "--server-name",
                SERVER_NAME,
                "--config-path",
            ])
            .arg(&config)
            .args(["--generate-config", "--report-stats=no"])
            .current_dir(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .output()
            .context("running Synapse's --generate-config")?;
        ensure!(
            status.status.success(),
            "synapse --generate-config failed: {}",
            String::from_utf8_lossy(&status.stderr)
        );
        // The venv has PyYAML (Synapse reads its configuration with it).
        let edit = r#"
import sys, yaml
path, port, registration, dir = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
c = yaml.safe_load(open(path))
c["listeners"] = [{"port": port, "bind_addresses": ["127.0.0.1"], "type": "http", "tls": False,
                   "x_forwarded": False, "resources": [{"names": ["client"], "compress": False}]}]
c["database"] = {"name": "sqlite3", "args": {"database": dir + "/homeserver.db"}}
c["app_service_config_files"] = [registration]
c["enable_registration"] = False
c["registration_shared_secret"] = "swallow-test-shared-secret"
c["trusted_key_servers"] = []
c["suppress_key_server_warning"] = True
c["report_stats"] = False
c["presence"] = {"enabled": False}
lots = {"per_second": 1000, "burst_count": 1000}
for key in ["rc_message", "rc_registration", "rc_admin_redaction", "rc_3pid_validation"]:
    c[key] = lots
c["rc_login"] = {"address": lots, "account": lots, "failed_attempts": lots}
c["rc_joins"] = {"local": lots, "remote": lots}
c["rc_joins_per_room"] = lots
c["rc_invites"] = {"per_room": lots, "per_user": lots, "per_issuer": lots}
yaml.safe_dump(c, open(path, "w"))
"#;
        let edited = std::process::Command::new(&python)
            .args(["-c", edit])
            .arg(&config)
            .arg(port.to_string())
            .arg(registration)
            .arg(dir)
            .output()
            .context("editing homeserver.yaml")?;
        ensure!(
            edited.status.success(),
            "editing homeserver.yaml: {}",
            String::from_utf8_lossy(&edited.stderr)
        );
        let log = std::fs::File::create(dir.join("synapse.out")).context("creating synapse.out")?;
        let child = {
            use std::os::unix::process::CommandExt as _;
            std::process::Command::new(&python)
                .args(["-m", "synapse.app.homeserver", "--config-path"])
                .arg(&config)
                .current_dir(dir)
                .stdout(log.try_clone()?)
                .stderr(log)
                .process_group(0)
                .spawn()
                .context("starting Synapse")?
        };
        let mut synapse = Synapse {
            base: format!("http://127.0.0.1:{port}"),
            dir: dir.to_owned(),
            venv: venv.to_owned(),
            child,
        };
        synapse.wait_up().await?;
        Ok(synapse)
    }

    async fn wait_up(&mut self) -> anyhow::Result<()> {
        let client = reqwest::Client::new();
        let url = format!("{}/_matrix/client/versions", self.base);
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!("Synapse exited ({status}) while starting: {}", self.output_tail());
            }
            if let Ok(r) = client.get(&url).timeout(Duration::from_secs(2)).send().await
                && r.status().is_success()
            {
                return Ok(());
            }
            if started.elapsed() > START_BOUND {
                bail!(
                    "Synapse did not answer {url} within {START_BOUND:?}: {}",
                    self.output_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// The end of Synapse's output and log, for failure messages.
    pub fn output_tail(&self) -> String {
        let mut out = String::new();
        for name in ["synapse.out", "homeserver.log"] {
            if let Ok(text) = std::fs::read_to_string(self.dir.join(name)) {
                let start = text.len().saturating_sub(3000);
                let start = (start..text.len()).find(|&i| text.is_char_boundary(i)).unwrap_or(0);
                out.push_str(&format!("\n--- {name} ---\n{}", &text[start..]));
            }
        }
        out
    }

    /// Registers `user` (a local user) with the shared secret and logs it in.
    pub async fn user(&self, localpart: &str, display_name: &str) -> anyhow::Result<MatrixUser> {
        let output = tokio::process::Command::new(self.venv.join("bin/register_new_matrix_user"))
            .arg("-c")
            .arg(self.dir.join("homeserver.yaml"))
            .args(["-u", localpart, "-p", "swallow-test-password", "--no-admin"])
            .arg(&self.base)
            .output()
            .await
            .context("running register_new_matrix_user")?;
        ensure!(
            output.status.success(),
            "register_new_matrix_user {localpart}: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        let login = json!({"type": "m.login.password",
            "identifier": {"type": "m.id.user", "user": localpart}, "password": "swallow-test-password"});
        let answer = MatrixUser::request(
            &reqwest::Client::new(),
            reqwest::Method::POST,
            &format!("{}/_matrix/client/v3/login", self.base),
            None,
            &login,
        )
        .await?;
        let token = answer["access_token"]
            .as_str()
            .context("login without an access_token")?;
        let user = MatrixUser {
            base: self.base.clone(),
            user_id: format!("@{localpart}:{SERVER_NAME}"),
            token: token.to_owned(),
            masquerade: false,
            client: reqwest::Client::new(),
        };
        let path = format!("/profile/{}/displayname", enc(&user.user_id));
        user.call(reqwest::Method::PUT, &path, &json!({"displayname": display_name}))
            .await?;
        Ok(user)
    }
}

impl Drop for Synapse {
    fn drop(&mut self) {
        let pid = self.child.id();
        let _ = std::process::Command::new("kill")
            .args(["-KILL", "--", &format!("-{pid}")])
            .status();
        let _ = self.child.wait();
    }
}

/// A path segment, percent-encoded (room ids hold `!` and `:`, event ids `$`).
pub fn enc(segment: &str) -> String {
    let mut out = String::new();
    for b in segment.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A user (or the application service, with its token) of the client-server API.
pub struct MatrixUser {
    pub base: String,
    pub user_id: String,
    pub token: String,
    /// `?user_id=` on every call (the application service acting as one of its users).
    masquerade: bool,
    client: reqwest::Client,
}

impl MatrixUser {
    /// The application service itself: its `as_token`, acting as `user_id`
    /// (`?user_id=` masquerading).
    pub fn appservice(base: &str, as_token: &str, user_id: &str) -> MatrixUser {
        MatrixUser {
            base: base.to_owned(),
            user_id: user_id.to_owned(),
            token: as_token.to_owned(),
            masquerade: true,
            client: reqwest::Client::new(),
        }
    }

    async fn request(
        client: &reqwest::Client,
        method: reqwest::Method,
        url: &str,
        token: Option<&str>,
        body: &Value,
    ) -> anyhow::Result<Value> {
        let mut r = client.request(method.clone(), url).timeout(Duration::from_secs(10));
        if let Some(token) = token {
            r = r.bearer_auth(token);
        }
        if method != reqwest::Method::GET {
            r = r.json(body);
        }
        let response = r.send().await.with_context(|| format!("{method} {url}"))?;
        let status = response.status();
        let text = response.text().await.unwrap_or_default();
        ensure!(status.is_success(), "{method} {url}: HTTP {status}: {text}");
        Ok(serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    /// `method /_matrix/client/v3<path>` as this user.
    pub async fn call(&self, method: reqwest::Method, path: &str, body: &Value) -> anyhow::Result<Value> {
        let mut url = format!("{}/_matrix/client/v3{path}", self.base);
        if self.masquerade {
            url.push(if url.contains('?') { '&' } else { '?' });
            url.push_str(&format!("user_id={}", enc(&self.user_id)));
        }
        Self::request(&self.client, method, &url, Some(&self.token), body).await
    }

    /// Creates a public room named `name` with the alias `#<alias>:<server>`.
    pub async fn create_public_room(&self, name: &str, alias: &str) -> anyhow::Result<String> {
        let body = json!({"preset": "public_chat", "name": name, "room_alias_name": alias});
        let answer = self.call(reqwest::Method::POST, "/createRoom", &body).await?;
        Ok(answer["room_id"]
            .as_str()
            .context("createRoom without a room_id")?
            .to_owned())
    }

    pub async fn invite(&self, room: &str, user: &str) -> anyhow::Result<()> {
        let path = format!("/rooms/{}/invite", enc(room));
        self.call(reqwest::Method::POST, &path, &json!({"user_id": user}))
            .await?;
        Ok(())
    }

    /// Sends a text message (in `thread`, when given); its event id.
    pub async fn send(&self, room: &str, text: &str, thread: Option<&str>) -> anyhow::Result<String> {
        let mut content = json!({"msgtype": "m.text", "body": text});
        if let Some(root) = thread {
            content["m.relates_to"] = json!({"rel_type": "m.thread", "event_id": root});
        }
        let txn = uuid::Uuid::new_v4().simple().to_string();
        let path = format!("/rooms/{}/send/m.room.message/{txn}", enc(room));
        let answer = self.call(reqwest::Method::PUT, &path, &content).await?;
        Ok(answer["event_id"]
            .as_str()
            .context("send without an event_id")?
            .to_owned())
    }

    /// The room's latest messages as this user sees them, newest first.
    pub async fn messages(&self, room: &str) -> anyhow::Result<Vec<Value>> {
        let path = format!("/rooms/{}/messages?dir=b&limit=100", enc(room));
        let answer = self.call(reqwest::Method::GET, &path, &Value::Null).await?;
        Ok(answer["chunk"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .into_iter()
            .filter(|e| e["type"] == "m.room.message")
            .collect())
    }

    /// Waits (at most `bound`) until `user` is joined to `room`.
    pub async fn until_joined(&self, room: &str, user: &str, bound: Duration) -> anyhow::Result<()> {
        let started = Instant::now();
        let path = format!("/rooms/{}/joined_members", enc(room));
        loop {
            let answer = self.call(reqwest::Method::GET, &path, &Value::Null).await?;
            if answer["joined"].get(user).is_some() {
                return Ok(());
            }
            if started.elapsed() > bound {
                bail!(
                    "{user} did not join {room} within {bound:?} (members: {})",
                    answer["joined"]
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// `user`'s display name in `room`.
    pub async fn display_name_in(&self, room: &str, user: &str) -> anyhow::Result<String> {
        let path = format!("/rooms/{}/state/m.room.member/{}", enc(room), enc(user));
        let answer = self.call(reqwest::Method::GET, &path, &Value::Null).await?;
        Ok(answer["displayname"].as_str().unwrap_or("").to_owned())
    }
}
