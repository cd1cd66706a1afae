//! The POST of docs/contract.md §4: the fields of Slack's legacy outgoing webhooks, form-encoded (or JSON), the
//! Standard Webhooks headers (one signature per signing secret, so handlers
//! keep verifying while a secret is rotated) and the integration's own
//! headers.

use base64::Engine as _;
use hmac::{Hmac, Mac};
use http::header::{HeaderName, HeaderValue};
use sha2::Sha256;

use swallow_shared::config::{ContentType, Integration};
use swallow_shared::wire::messages::DeliveryJob;

/// The body and headers of one attempt.
#[derive(Debug, Clone, PartialEq)]
pub struct Post {
    pub content_type: &'static str,
    pub body: Vec<u8>,
    /// Headers beyond Content-Type and User-Agent: the Standard Webhooks
    /// ones, then the integration's `headers`.
    pub headers: Vec<(HeaderName, HeaderValue)>,
}

/// The legacy POST's fields, in Slack's order (+ `thread_ts` in a thread).
pub fn fields<'a>(job: &'a DeliveryJob, integration: &'a Integration) -> Vec<(&'static str, &'a str)> {
    let e = &job.event;
    let mut f = vec![
        ("token", integration.token.as_str()),
        ("team_id", e.team_id.as_str()),
        ("team_domain", e.team_domain.as_str()),
        ("service_id", integration.id.as_str()),
        ("channel_id", e.channel_id.as_str()),
        ("channel_name", e.channel_name.as_str()),
        ("timestamp", e.ts.as_str()),
        ("user_id", e.user_id.as_str()),
        ("user_name", e.user_name.as_str()),
        ("text", e.text.as_str()),
        ("trigger_word", job.trigger_word.as_str()),
    ];
    if let Some(thread_ts) = e.thread_ts.as_deref().filter(|t| !t.is_empty()) {
        f.push(("thread_ts", thread_ts));
    }
    f
}

/// The fields form-encoded, as `serde_urlencoded::to_string` does (it is
/// built on `form_urlencoded`), into a buffer sized once: through serde, and
/// growing from empty, the encoding cost twice as many instructions.
fn form_body(fields: &[(&str, &str)]) -> Vec<u8> {
    // Encoding at most triples a byte (`%XX`); most bytes stay one.
    let guess: usize = fields.iter().map(|(k, v)| k.len() + v.len() + v.len() / 2 + 2).sum();
    form_urlencoded::Serializer::new(String::with_capacity(guess))
        .extend_pairs(fields)
        .finish()
        .into_bytes()
}

/// Builds one attempt's POST; `now_secs` is the `webhook-timestamp`.
pub fn build(job: &DeliveryJob, integration: &Integration, now_secs: u64) -> Post {
    let fields = fields(job, integration);
    let (content_type, body) = match integration.content_type {
        ContentType::Form => ("application/x-www-form-urlencoded", form_body(&fields)),
        ContentType::Json => {
            let map: serde_json::Map<String, serde_json::Value> =
                fields.iter().map(|(k, v)| ((*k).to_owned(), (*v).into())).collect();
            (
                "application/json",
                serde_json::to_vec(&map).expect("a map always serializes"),
            )
        }
    };
    let timestamp = now_secs.to_string();
    let text = |v: &str| HeaderValue::from_str(v).expect("ids, timestamps and base64 are visible ASCII");
    let mut headers = vec![
        (HeaderName::from_static("webhook-id"), text(&job.delivery_id)),
        (HeaderName::from_static("webhook-timestamp"), text(&timestamp)),
    ];
    if !integration.signing_keys.is_empty() {
        let signatures: Vec<String> = integration
            .signing_keys
            .iter()
            .map(|key| sign(key, &job.delivery_id, &timestamp, &body))
            .collect();
        headers.push((
            HeaderName::from_static("webhook-signature"),
            text(&signatures.join(" ")),
        ));
    }
    headers.extend(integration.headers.iter().cloned());
    Post {
        content_type,
        body,
        headers,
    }
}

/// Standard Webhooks: `v1,` + base64(HMAC-SHA256(key, "id.timestamp.body")).
pub fn sign(key: &[u8], id: &str, timestamp: &str, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes any key length");
    mac.update(id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.as_bytes());
    mac.update(b".");
    mac.update(body);
    format!(
        "v1,{}",
        base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use swallow_shared::wire::messages::RetryState;
    use swallow_shared::{ChatEvent, Config};

    fn seed() -> (DeliveryJob, std::sync::Arc<Integration>) {
        let config = Config::parse(
            r##"[[integrations]]
id = "googlebot"
team_id = "T0001"
trigger_words = ["googlebot:"]
urls = ["http://127.0.0.1:1/"]
token = "XXXXXXXXXXXXXXXXXX"
signing_secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
"##,
            None,
        )
        .unwrap();
        let event: ChatEvent = serde_json::from_str(
            r#"{"team_id":"T0001","team_domain":"example","channel_id":"C2147483705","channel_name":"test",
                "user_id":"U2147483697","user_name":"Steve","ts":"1355517523.000005",
                "text":"googlebot: What is the air-speed velocity of an unladen swallow?"}"#,
        )
        .unwrap();
        let job = DeliveryJob {
            v: 1,
            delivery_id: "msg_p5jXN8AQM9LWM0D4loKWxJek".into(),
            integration_id: "googlebot".into(),
            url: "http://127.0.0.1:1/".into(),
            trigger_word: "googlebot:".into(),
            event,
            retry: RetryState::new(0),
        };
        (job, config.integrations.list[0].clone())
    }

    #[test]
    fn the_seed_post_form_encoded() {
        let (job, integration) = seed();
        let post = build(&job, &integration, 1614265330);
        assert_eq!(post.content_type, "application/x-www-form-urlencoded");
        assert_eq!(
            String::from_utf8(post.body).unwrap(),
            "token=XXXXXXXXXXXXXXXXXX&team_id=T0001&team_domain=example&service_id=googlebot\
             &channel_id=C2147483705&channel_name=test&timestamp=1355517523.000005&user_id=U2147483697\
             &user_name=Steve&text=googlebot%3A+What+is+the+air-speed+velocity+of+an+unladen+swallow%3F\
             &trigger_word=googlebot%3A"
        );
        assert_eq!(post.headers[0].0, "webhook-id");
        assert_eq!(post.headers[0].1, "msg_p5jXN8AQM9LWM0D4loKWxJek");
        assert_eq!(post.headers[1].0, "webhook-timestamp");
        assert_eq!(post.headers[1].1, "1614265330");
    }

    #[test]
    fn the_form_body_is_what_serde_urlencoded_makes() {
        let (mut job, integration) = seed();
        for text in [
            "",
            "plain",
            "a+b=c&d e%f/g?h#i",
            "été — 日本語 🐦 \u{0} \n\t\"'<>",
            &"x".repeat(5_000),
        ] {
            job.event.text = text.into();
            job.event.thread_ts = (!text.is_empty()).then(|| "1355517500.000001".into());
            let fields = fields(&job, &integration);
            assert_eq!(
                form_body(&fields),
                serde_urlencoded::to_string(&fields).unwrap().into_bytes(),
                "{text:?}"
            );
        }
    }

    #[test]
    fn signature_matches_the_standard_webhooks_example() {
        // The example from the Standard Webhooks specification.
        let key = base64::engine::general_purpose::STANDARD
            .decode("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
            .unwrap();
        let sig = sign(
            &key,
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            "1614265330",
            br#"{"test": 2432232314}"#,
        );
        assert_eq!(sig, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
    }

    #[test]
    fn json_and_threads() {
        let (mut job, integration) = seed();
        job.event.thread_ts = Some("1355517500.000001".into());
        let mut integration = (*integration).clone();
        integration.content_type = ContentType::Json;
        let post = build(&job, &integration, 1);
        assert_eq!(post.content_type, "application/json");
        let v: serde_json::Value = serde_json::from_slice(&post.body).unwrap();
        assert_eq!(v["thread_ts"], "1355517500.000001");
        assert_eq!(v["service_id"], "googlebot");
        assert_eq!(v.as_object().unwrap().len(), 12);
        assert!(
            post.headers
                .iter()
                .any(|(k, v)| k == "webhook-signature" && v.to_str().unwrap().starts_with("v1,"))
        );
    }

    #[test]
    fn one_signature_per_secret_then_the_integrations_headers() {
        let (job, integration) = seed();
        let mut integration = (*integration).clone();
        let second = vec![7u8; 24];
        integration.signing_keys.push(second.clone());
        integration.headers = vec![(HeaderName::from_static("x-api-key"), HeaderValue::from_static("k1"))];
        let post = build(&job, &integration, 1614265330);
        let want = format!(
            "{} {}",
            sign(&integration.signing_keys[0], &job.delivery_id, "1614265330", &post.body),
            sign(&second, &job.delivery_id, "1614265330", &post.body)
        );
        let names: Vec<&str> = post.headers.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            names,
            ["webhook-id", "webhook-timestamp", "webhook-signature", "x-api-key"]
        );
        assert_eq!(post.headers[2].1, want.as_str());
        assert_eq!(post.headers[3].1, "k1");
    }
}
