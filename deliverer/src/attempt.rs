//! One HTTP attempt and what it means (docs/contract.md §5): delivered (perhaps with
//! a reply), retry later (perhaps no sooner than `Retry-After`), gone (410),
//! or a refused destination.

use std::time::{Duration, SystemTime};

use bytes::Bytes;
use futures_util::TryFutureExt as _;
use http::header::{ACCEPT, CONTENT_LENGTH, CONTENT_TYPE, HeaderMap, HeaderValue, RETRY_AFTER, USER_AGENT};
use http::{Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;

use swallow_shared::config::Integration;
use swallow_shared::wire::messages::{DeliveryJob, HandlerAnswer};

use crate::client::{ConnectError, ExchangeError};
use crate::destination::{AddressPolicy, blocked_in};
use crate::{HttpClient, request};

/// Answers larger than this are cut off and treated as not JSON.
pub const MAX_ANSWER_BYTES: usize = 1024 * 1024;

#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Delivered {
        answer: Option<HandlerAnswer>,
    },
    Retry {
        error: String,
        retry_after: Option<Duration>,
    },
    Gone,
    Blocked(String),
}

/// What an attempt gave, with the bounded status class for metrics
/// (`2xx`…`5xx`, `timeout`, `connect`, `error`, `blocked`).
#[derive(Debug, Clone)]
pub struct Attempted {
    pub outcome: Outcome,
    pub class: &'static str,
    pub status: Option<u16>,
}

pub async fn attempt(
    client: &HttpClient,
    policy: &AddressPolicy,
    job: &DeliveryJob,
    integration: &Integration,
) -> Attempted {
    // The request is built, and handed to the client, before the first
    // await: what an attempt holds while it waits is the client's future,
    // not the request's parts besides (see `exchange`).
    let exchange = match prepare(policy, job, integration) {
        Ok(request) => exchange(client, request),
        Err(refused) => {
            return Attempted {
                outcome: Outcome::Blocked(refused),
                class: "blocked",
                status: None,
            };
        }
    };
    // The timeout covers the whole exchange: connecting, sending, the answer's body.
    match tokio::time::timeout(integration.timeout, exchange).await {
        Ok(Ok(attempted)) => attempted,
        Ok(Err(e)) => transport_error(&*e),
        Err(_) => Attempted {
            outcome: Outcome::Retry {
                error: format!("timeout: no answer within {} ms", integration.timeout.as_millis()),
                retry_after: None,
            },
            class: "timeout",
            status: None,
        },
    }
}

/// The job's POST, or why it may not be sent (its destination refused).
fn prepare(
    policy: &AddressPolicy,
    job: &DeliveryJob,
    integration: &Integration,
) -> Result<Request<Full<Bytes>>, String> {
    let invalid = |e: &dyn std::fmt::Display| format!("invalid URL {:?}: {e}", job.url);
    // The integration's URLs were parsed with its configuration, and a job's
    // URL is one of them as the matcher wrote it (`Url::as_str`, which parses
    // back to the same URL), unless the configuration changed since: only
    // then is it parsed here (about 6,000 instructions an attempt saved).
    let parsed;
    let url = match integration.urls.iter().find(|u| u.as_str() == job.url) {
        Some(known) => known,
        None => match url::Url::parse(&job.url) {
            Ok(u) => {
                parsed = u;
                &parsed
            }
            Err(e) => return Err(invalid(&e)),
        },
    };
    policy.check_url(url).map_err(|blocked| blocked.to_string())?;
    // The parsed URL's normal form (IDNA, percent-encoding) is what is sent.
    let uri = url.as_str().parse::<Uri>().map_err(|e| invalid(&e))?;
    let now_secs = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let post = request::build(job, integration, now_secs);
    let mut request = Request::post(uri)
        .header(USER_AGENT, HeaderValue::from_static(swallow_shared::USER_AGENT))
        .header(ACCEPT, HeaderValue::from_static("*/*"))
        .header(CONTENT_TYPE, HeaderValue::from_static(post.content_type))
        .body(Full::new(Bytes::from(post.body)))
        .expect("a parsed URI and static headers make a request");
    request.headers_mut().extend(post.headers);
    Ok(request)
}

/// Sends the request and reads what the handler answered.
///
/// Not an `async fn`: one would keep the request (256 bytes) for as long
/// as the exchange lasts, and an `async fn` keeps each argument twice
/// (its own, and the local it is moved into). The request goes to the
/// client at once; the future holds the client's future, then in its place
/// (`and_then`, where an `async` block awaiting it would keep it twice)
/// the answer's status, headers it needs and body, each only while needed
/// (BENCHMARKS.md, "A request under way: its futures' bytes").
fn exchange(
    client: &HttpClient,
    request: Request<Full<Bytes>>,
) -> impl Future<Output = Result<Attempted, ExchangeError>> + Send + use<> {
    client.request(request).and_then(|response| async move {
        let (status, retry_after, body) = head(response);
        let code = status.as_u16();
        let class = match code {
            200..=299 => "2xx",
            300..=399 => "3xx",
            400..=499 => "4xx",
            _ => "5xx",
        };
        if status.is_success() {
            let answer = match body {
                Some(body) => read_capped(body).await?.and_then(|bytes| parse_answer(&bytes)),
                None => None,
            };
            return Ok(Attempted {
                outcome: Outcome::Delivered { answer },
                class,
                status: Some(code),
            });
        }
        let outcome = if code == 410 {
            Outcome::Gone
        } else {
            Outcome::Retry {
                error: format!("HTTP {code}"),
                retry_after: if code == 429 || code == 503 { retry_after } else { None },
            }
        };
        Ok(Attempted {
            outcome,
            class,
            status: Some(code),
        })
    })
}

/// What the exchange needs of an answer's head: its status, its
/// `Retry-After`, and its body unless it declares more than
/// [`MAX_ANSWER_BYTES`] (`None`, read as no answer).
fn head(response: Response<Incoming>) -> (StatusCode, Option<Duration>, Option<Incoming>) {
    let (parts, body) = response.into_parts();
    let declared = parts
        .headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    let body = declared.is_none_or(|n| n <= MAX_ANSWER_BYTES as u64).then_some(body);
    (parts.status, retry_after(&parts.headers), body)
}

fn transport_error(e: &(dyn std::error::Error + 'static)) -> Attempted {
    if let Some(blocked) = blocked_in(e) {
        return Attempted {
            outcome: Outcome::Blocked(blocked.to_string()),
            class: "blocked",
            status: None,
        };
    }
    let connect = e.is::<ConnectError>()
        || e.downcast_ref::<hyper_util::client::legacy::Error>()
            .is_some_and(|e| e.is_connect());
    let class = if connect { "connect" } else { "error" };
    // The full chain says "connection refused" or "reset by peer".
    let mut message = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        message.push_str(": ");
        message.push_str(&s.to_string());
        source = s.source();
    }
    Attempted {
        outcome: Outcome::Retry {
            error: format!("{class}: {message}"),
            retry_after: None,
        },
        class,
        status: None,
    }
}

/// The body, or `None` when it is larger than [`MAX_ANSWER_BYTES`].
async fn read_capped(mut incoming: Incoming) -> Result<Option<Vec<u8>>, hyper::Error> {
    let mut body = Vec::new();
    while let Some(frame) = incoming.frame().await {
        if let Ok(chunk) = frame?.into_data() {
            if body.len() + chunk.len() > MAX_ANSWER_BYTES {
                return Ok(None);
            }
            body.extend_from_slice(&chunk);
        }
    }
    Ok(Some(body))
}

/// `Retry-After` as seconds or an HTTP date.
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    swallow_shared::job::retry::parse_retry_after(headers.get(RETRY_AFTER)?.to_str().ok()?)
}

/// A reply when the answer is a JSON object with a non-empty `text`.
pub fn parse_answer(bytes: &[u8]) -> Option<HandlerAnswer> {
    let value: serde_json::Value = serde_json::from_slice(bytes).ok()?;
    let obj = value.as_object()?;
    let string = |k: &str| {
        obj.get(k)
            .and_then(|v| v.as_str())
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
    };
    let text = string("text")?;
    Some(HandlerAnswer {
        text,
        username: string("username"),
        icon_url: string("icon_url"),
        icon_emoji: string("icon_emoji"),
        attachments: obj.get("attachments").filter(|a| !a.is_null()).cloned(),
        response_type: string("response_type"),
        thread_ts: string("thread_ts"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers() {
        assert_eq!(parse_answer(b""), None);
        assert_eq!(parse_answer(b"ok"), None);
        assert_eq!(parse_answer(b"{}"), None);
        assert_eq!(parse_answer(br#"{"text":""}"#), None);
        assert_eq!(parse_answer(br#"{"text":5}"#), None);
        assert_eq!(parse_answer(br#"["text"]"#), None);
        let a = parse_answer(
            br#"{"text":"African or European?","username":"monty","response_type":"comment","attachments":[{"a":1}]}"#,
        )
        .unwrap();
        assert_eq!(a.text, "African or European?");
        assert_eq!(a.username.as_deref(), Some("monty"));
        assert_eq!(a.response_type.as_deref(), Some("comment"));
        assert_eq!(a.attachments, Some(serde_json::json!([{"a": 1}])));
    }

    /// A handler on loopback that answers 200 to every request and reports
    /// each request's first line.
    async fn handler() -> (std::net::SocketAddr, tokio::sync::mpsc::UnboundedReceiver<String>) {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (seen, lines) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let seen = seen.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 8192];
                    let n = stream.read(&mut buf).await.unwrap_or(0);
                    let head = String::from_utf8_lossy(&buf[..n]);
                    let _ = seen.send(head.lines().next().unwrap_or("").to_owned());
                    let _ = stream
                        .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                        .await;
                });
            }
        });
        (addr, lines)
    }

    /// Integration `g`'s job for "g hi", to `url`.
    fn job(url: &str) -> DeliveryJob {
        DeliveryJob {
            v: 1,
            delivery_id: "msg_1".into(),
            integration_id: "g".into(),
            url: url.into(),
            trigger_word: "g".into(),
            event: serde_json::from_str(
                r#"{"team_id":"T1","channel_id":"C1","user_id":"U1","user_name":"u","ts":"1.000001","text":"g hi"}"#,
            )
            .unwrap(),
            retry: swallow_shared::wire::messages::RetryState::new(0),
        }
    }

    /// The URL sent is the job's, whether the integration still lists it
    /// (parsed with the configuration) or not (the configuration changed
    /// since the job was made: parsed here), and a job's URL is checked
    /// against the allowed networks either way.
    #[tokio::test]
    async fn the_jobs_url_whether_the_configuration_still_lists_it_or_not() {
        let (addr, mut lines) = handler().await;
        let config = swallow_shared::Config::parse(
            &format!(
                "[[integrations]]\nid = \"g\"\nteam_id = \"T1\"\ntrigger_words = [\"g\"]\n\
                 urls = [\"http://{addr}/listed\"]\ntoken = \"t\"\n"
            ),
            None,
        )
        .unwrap();
        let integration = config.integrations.list[0].clone();
        let policy = AddressPolicy::new(vec!["127.0.0.0/8".parse().unwrap()]);
        let client = crate::http_client(&policy, 4).unwrap();
        for (url, path) in [
            (format!("http://{addr}/listed"), "/listed"),
            (format!("http://{addr}/unlisted"), "/unlisted"),
        ] {
            let attempted = attempt(&client, &policy, &job(&url), &integration).await;
            assert!(
                matches!(attempted.outcome, Outcome::Delivered { .. }),
                "{url}: {:?}",
                attempted.outcome
            );
            let line = tokio::time::timeout(Duration::from_secs(10), lines.recv())
                .await
                .expect("the handler saw the request within 10 s")
                .unwrap();
            assert_eq!(line, format!("POST {path} HTTP/1.1"));
        }
        for url in ["http://10.0.0.1/elsewhere", "not a url"] {
            let attempted = attempt(&client, &policy, &job(url), &integration).await;
            assert!(
                matches!(attempted.outcome, Outcome::Blocked(_)) && attempted.class == "blocked",
                "{url}: {:?}",
                attempted.outcome
            );
        }
    }

    /// A TLS handler's first request connects through the client's own
    /// HTTP/2 probe, whose failures read as the pooled client's do: a
    /// refused connection is `connect`, a name resolving to an address not
    /// allowed is `blocked`.
    #[tokio::test]
    async fn https_connect_failures_are_classed_as_over_http() {
        let config = swallow_shared::Config::parse(
            "[[integrations]]\nid = \"g\"\nteam_id = \"T1\"\ntrigger_words = [\"g\"]\n\
             urls = [\"https://127.0.0.1:1/\"]\ntoken = \"t\"\n",
            None,
        )
        .unwrap();
        let integration = config.integrations.list[0].clone();
        let refused = {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            listener.local_addr().unwrap()
        };
        let allow_loopback = AddressPolicy::new(vec!["127.0.0.0/8".parse().unwrap()]);
        let client = crate::http_client(&allow_loopback, 4).unwrap();
        let attempted = attempt(
            &client,
            &allow_loopback,
            &job(&format!("https://{refused}/")),
            &integration,
        )
        .await;
        assert_eq!(attempted.class, "connect", "{:?}", attempted.outcome);
        assert!(
            matches!(&attempted.outcome, Outcome::Retry { error, .. } if error.contains("refused")),
            "{:?}",
            attempted.outcome
        );
        let default_policy = AddressPolicy::new(Vec::new());
        let client = crate::http_client(&default_policy, 4).unwrap();
        let url = format!("https://localhost:{}/", refused.port());
        let attempted = attempt(&client, &default_policy, &job(&url), &integration).await;
        assert_eq!(attempted.class, "blocked", "{:?}", attempted.outcome);
    }

    #[test]
    fn retry_after_header() {
        let mut h = HeaderMap::new();
        assert_eq!(retry_after(&h), None);
        h.insert(RETRY_AFTER, "2".parse().unwrap());
        assert_eq!(retry_after(&h), Some(Duration::from_secs(2)));
    }
}
