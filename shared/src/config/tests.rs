//! The configuration file as operators write it: good files and every kind of mistake.

use super::*;

const GOOD: &str = r##"
[[integrations]]
id = "googlebot"
team_id = "T0001"
channel = "#test"
trigger_words = ["googlebot:"]
urls = ["http://127.0.0.1:8080/hook"]
token = "XXXXXXXXXXXXXXXXXX"
signing_secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
rate_limit = { per_second = 2.0, burst = 3, on_limit = "drop" }
"##;

#[test]
fn parses_a_good_file_with_defaults() {
    let c = Config::parse(GOOD, None).unwrap();
    assert_eq!(c.broker.prefix, "swallow");
    let i = &c.integrations.list[0];
    assert_eq!(i.channel, Some(ChannelRef::Name("test".into())));
    assert_eq!(i.bot_name, "googlebot");
    assert_eq!(i.content_type, ContentType::Form);
    assert_eq!(i.trigger_match, TriggerMatch::Prefix);
    assert!(!i.case_sensitive);
    assert_eq!(i.rate_limit.burst, 3);
    assert_eq!(i.rate_limit.on_limit, OnLimit::Drop);
    assert_eq!(i.timeout, Duration::from_millis(5000));
    assert_eq!(i.max_attempts, 8);
    assert_eq!(i.signing_keys.len(), 1);
    assert_eq!(i.channel_types, [ChannelType::Public]);
    assert_eq!(c.responder.sink, Sink::Amqp);
}

fn error_of(text: &str) -> String {
    Config::parse(text, Some(Path::new("/etc/swallow/swallow.toml")))
        .unwrap_err()
        .to_string()
}

#[test]
fn errors_name_the_file_the_integration_and_the_field() {
    let cases: &[(&str, &str, &str)] = &[
        (
            "urls = [\"http://x/\"]",
            "urls = [\"/relative\"]",
            "integration \"googlebot\": urls[0]: \"/relative\": relative URL without a base",
        ),
        (
            "urls = [\"http://x/\"]",
            "urls = [\"ftp://x/\"]",
            "urls[0]: \"ftp://x/\": scheme must be http or https",
        ),
        ("urls = [\"http://x/\"]", "urls = []", "urls: at least one handler URL"),
        (
            "token = \"t\"",
            "token = \"\"",
            "integration \"googlebot\": token: required",
        ),
        (
            "channel = \"#test\"\n",
            "",
            "integration \"googlebot\": trigger_words: required when no channel",
        ),
        (
            "rate_limit = {}",
            "rate_limit = { per_second = 0.0 }",
            "rate_limit.per_second: must be a number of at least 0.000278 (one an hour), not 0",
        ),
        (
            "rate_limit = {}",
            "rate_limit = { per_second = 1e-300 }",
            "rate_limit.per_second: must be a number of at least",
        ),
        (
            "rate_limit = {}",
            "rate_limit = { burst = 0 }",
            "rate_limit.burst: must be at least 1, not 0",
        ),
        (
            "rate_limit = {}",
            "rate_limit = { on_limit = \"wait\" }",
            "unknown variant `wait`, expected `delay` or `drop`",
        ),
        (
            "token = \"t\"",
            "token = \"t\"\nsigning_secret = \"abc\"",
            "signing_secret: must start with \"whsec_\"",
        ),
        (
            "token = \"t\"",
            "token = \"t\"\ncontent_type = \"xml\"",
            "unknown variant `xml`, expected `form` or `json`",
        ),
        (
            "token = \"t\"",
            "token = \"t\"\ntrigger_word = [\"x\"]",
            "integration \"googlebot\": trigger_word: unknown field; did you mean `trigger_words`?",
        ),
    ];
    let base = "[[integrations]]\nid = \"googlebot\"\nteam_id = \"T1\"\nchannel = \"#test\"\nurls = [\"http://x/\"]\ntoken = \"t\"\nrate_limit = {}\n";
    for (from, to, want) in cases {
        let text = base.replacen(from, to, 1);
        let got = error_of(&text);
        assert!(got.contains("/etc/swallow/swallow.toml"), "{got}");
        assert!(
            got.contains(want),
            "for {to:?}: got {got:?}, want it to contain {want:?}"
        );
    }
}

#[test]
fn the_shipped_configurations_are_valid() {
    for (name, text) in [
        ("deploy/example.toml", include_str!("../../../deploy/example.toml")),
        ("deploy/compose.toml", include_str!("../../../deploy/compose.toml")),
    ] {
        let c = Config::parse(text, Some(Path::new(name))).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.integrations.list[0].id, "googlebot", "{name}");
    }
}

#[test]
fn errors_are_one_line_naming_the_integration_and_the_closest_field() {
    let one =
        "[[integrations]]\nid = \"a\"\nteam_id = \"T1\"\nchannel = \"C1\"\nurls = [\"http://x/\"]\ntoken = \"t\"\n";
    let file = "loading configuration from /etc/swallow/swallow.toml";
    let integrations = "loading integrations from /etc/swallow/swallow.toml";
    for (text, want) in [
        (
            format!("{one}[[integrations]]\nteam_id = \"T1\"\ntrigger_wrds = [\"x\"]\n"),
            format!("{integrations}: integration #2: trigger_wrds: unknown field; did you mean `trigger_words`?"),
        ),
        (
            format!("{one}rate_limit = {{ per_secnd = 1.0 }}\n"),
            format!(
                "{integrations}: integration \"a\": rate_limit.per_secnd: unknown field; did you mean `per_second`?"
            ),
        ),
        (
            format!("{one}colour = \"red\"\n"),
            format!("{integrations}: integration \"a\": colour: unknown field; the known fields are `id`, `team_id`,"),
        ),
        (
            format!("{one}timeout_ms = \"5s\"\n"),
            format!("{integrations}: integration \"a\": timeout_ms: invalid type: string \"5s\", expected u64"),
        ),
        (
            "[deliverer]\nconcurency = 4\n".into(),
            format!("{file}: deliverer.concurency: unknown field; did you mean `concurrency`?"),
        ),
        (
            "[broker]\nurl = \"amqp://x\"\nprefix = swallow\n".into(),
            format!("{file}: line 3, column 10: "),
        ),
        (
            "integrations = 3\n".into(),
            format!("{file}: integrations: must be an array of tables ([[integrations]]), found integer"),
        ),
    ] {
        let got = error_of(&text);
        assert!(got.starts_with(&want), "got  {got}\nwant {want}");
        assert!(!got.contains('\n') && !got.contains('|'), "one line: {got}");
    }
}

#[test]
fn integration_options_and_their_errors() {
    let dir = std::env::temp_dir().join(format!("swallow-cfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("swallow.toml");
    std::fs::write(dir.join("token"), "from-file\n").unwrap();
    std::fs::write(dir.join("empty"), "\n").unwrap();
    std::fs::write(
        dir.join("secrets"),
        "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\nwhsec_AAAAAAAAAAAAAAAAAAAAAAAA\n",
    )
    .unwrap();
    let one = "[[integrations]]\nid = \"a\"\nteam_id = \"T1\"\nchannel = \"C1\"\nurls = [\"http://x/\"]\n";
    let parse = |extra: &str| Config::parse(&format!("{one}{extra}\n"), Some(&path));
    let good = parse(
            "token_file = \"token\"\nsigning_secret_file = \"secrets\"\nchannel_types = [\"im\", \"private\"]\nheaders = { \"X-Api-Key\" = \"k1\" }",
        )
        .unwrap();
    let i = &good.integrations.list[0];
    assert_eq!(i.token, "from-file");
    assert_eq!(i.signing_keys.len(), 2);
    assert_eq!(i.channel_types, [ChannelType::Im, ChannelType::Private]);
    assert_eq!(i.headers[0].0, "x-api-key");
    assert_eq!(i.headers[0].1, "k1");
    // The secret files read, each with its content's hash, for the
    // reload check.
    let read: Vec<(PathBuf, u64)> = ["token", "secrets"]
        .iter()
        .map(|f| (dir.join(f), content_hash(&std::fs::read(dir.join(f)).unwrap())))
        .collect();
    assert_eq!(good.secret_files, read);
    let list =
        parse("token = \"t\"\nsigning_secret = [\"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\", \"whsec_AAAA\"]").unwrap();
    assert_eq!(list.integrations.list[0].signing_keys.len(), 2);
    assert!(list.secret_files.is_empty(), "no secret file named");

    let shown = path.display();
    let d = dir.display();
    for (extra, want) in [
        (
            "token = \"t\"\nchannel_types = [\"dm\"]".to_owned(),
            "channel_types[0]: unknown variant `dm`, expected one of `public`, `private`, `im`, `mpim`".to_owned(),
        ),
        (
            "token = \"t\"\ntoken_file = \"token\"".into(),
            "token_file: give token or token_file, not both".into(),
        ),
        (
            "token_file = \"nope\"".into(),
            format!("token_file: reading {d}/nope: No such file"),
        ),
        (
            "token_file = \"empty\"".into(),
            format!("token_file: {d}/empty is empty"),
        ),
        (
            "token = \"t\"\nsigning_secret_file = \"token\"".into(),
            format!("signing_secret_file: {d}/token: secret 1: must start with \"whsec_\""),
        ),
        (
            "token = \"t\"\nsigning_secret = \"whsec_AAAA\"\nsigning_secret_file = \"secrets\"".into(),
            "signing_secret_file: give signing_secret or signing_secret_file, not both".into(),
        ),
        (
            "token = \"t\"\nsigning_secret = [\"whsec_AAAA\", \"nope\"]".into(),
            "signing_secret[1]: must start with \"whsec_\"".into(),
        ),
        (
            "token = \"t\"\nheaders = { \"User-Agent\" = \"me\" }".into(),
            "headers.\"User-Agent\": swallow sets this header itself".into(),
        ),
        (
            "token = \"t\"\nheaders = { \"Webhook-Signature\" = \"v1,x\" }".into(),
            "headers.\"Webhook-Signature\": swallow sets this header itself".into(),
        ),
        (
            "token = \"t\"\nheaders = { \"X Key\" = \"v\" }".into(),
            "headers.\"X Key\": is not a valid header name".into(),
        ),
        (
            "token = \"t\"\nheaders = { \"X-Key\" = \"a\\nb\" }".into(),
            "headers.\"X-Key\": the value must be visible ASCII".into(),
        ),
    ] {
        let got = parse(&extra).unwrap_err().to_string();
        let want = format!("loading integrations from {shown}: integration \"a\": {want}");
        assert!(got.starts_with(&want), "got  {got}\nwant {want}");
    }
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn the_log_table_picks_the_format() {
    assert_eq!(Config::parse("", None).unwrap().log.format, LogFormat::Text);
    assert_eq!(
        Config::parse("[log]\nformat = \"json\"", None).unwrap().log.format,
        LogFormat::Json
    );
    assert!(
        error_of("[log]\nformat = \"xml\"").ends_with("log.format: unknown variant `xml`, expected `text` or `json`")
    );
}

#[test]
fn duplicate_ids_are_refused() {
    let one =
        "[[integrations]]\nid = \"a\"\nteam_id = \"T1\"\nchannel = \"C1\"\nurls = [\"http://x/\"]\ntoken = \"t\"\n";
    let got = error_of(&format!("{one}{one}"));
    assert!(got.contains("integration \"a\": id: duplicate id"), "{got}");
}

#[test]
fn enumerated_fields_list_the_allowed_values() {
    let base =
        "[[integrations]]\nid = \"a\"\nteam_id = \"T1\"\nchannel = \"C1\"\nurls = [\"http://x/\"]\ntoken = \"t\"\n";
    for (line, want) in [
        (
            "content_type = \"xml\"",
            "unknown variant `xml`, expected `form` or `json`",
        ),
        (
            "trigger_match = \"any\"",
            "unknown variant `any`, expected `prefix` or `word`",
        ),
        (
            "rate_limit = { on_limit = \"wait\" }",
            "unknown variant `wait`, expected `delay` or `drop`",
        ),
    ] {
        let got = error_of(&format!("{base}{line}\n"));
        assert!(got.contains(want), "{line}: {got}");
    }
    let got = error_of("[responder]\nsink = \"irc\"");
    assert!(
        got.contains("unknown variant `irc`, expected one of `amqp`, `slack`, `webhook`"),
        "{got}"
    );
}

#[test]
fn a_zero_where_a_positive_number_is_needed_is_refused_not_raised() {
    for (text, field) in [
        ("[broker]\nprefetch = 0", "broker.prefetch"),
        ("[deliverer]\nconcurrency = 0", "deliverer.concurrency"),
        (
            "[deliverer]\nper_integration_concurrency = 0",
            "deliverer.per_integration_concurrency",
        ),
        ("[responder]\nmax_attempts = 0", "responder.max_attempts"),
        ("[responder]\nmax_age_s = 0", "responder.max_age_s"),
        ("[responder]\ntimeout_ms = 0", "responder.timeout_ms"),
        ("[responder]\nper_channel_burst = 0", "responder.per_channel_burst"),
    ] {
        let got = error_of(text);
        assert!(
            got.ends_with(&format!("{field}: must be at least 1, not 0")),
            "{text}: {got}"
        );
    }
    assert!(error_of("reload_interval_ms = 0").ends_with("reload_interval_ms: must be at least 50, not 0"));
}

#[test]
fn bad_sink_and_prefix_are_refused() {
    assert!(error_of("[responder]\nsink = \"webhook\"").contains("responder.webhook_url"));
    assert!(error_of("[broker]\nprefix = \"a b\"").contains("broker.prefix"));
    assert!(error_of("[deliverer]\nallow_networks = [\"nope\"]").contains("deliverer.allow_networks[0]"));
}

#[test]
fn the_delivery_limit_defaults_to_20_and_is_positive() {
    let c = Config::parse("", None).unwrap();
    assert_eq!(c.broker.delivery_limit, 20);
    let c = Config::parse("[broker]\ndelivery_limit = 3\n", None).unwrap();
    assert_eq!(c.broker.delivery_limit, 3);
    let args = c.broker.topology().work_queue_args("x");
    assert_eq!(
        args.inner().get("x-delivery-limit"),
        Some(&lapin::types::AMQPValue::LongLongInt(3))
    );
    assert!(error_of("[broker]\ndelivery_limit = 0").ends_with("broker.delivery_limit: must be at least 1, not 0"));
}

#[test]
fn broker_addresses_heartbeat_and_tls_files() {
    let c = Config::parse("", None).unwrap();
    assert_eq!(c.broker.urls.list(), [DEFAULT_AMQP_URL]);
    assert_eq!(c.broker.heartbeat_s, 10);
    let two = "[broker]\nurl = \"amqp://u:p1@n1:5672/%2f,amqp://u:p2@n2:5672/%2f\"\nheartbeat_s = 2\n";
    let c = Config::parse(two, None).unwrap();
    assert_eq!(c.broker.urls.list().len(), 2);
    assert_eq!(c.broker.heartbeat_s, 2);
    let bad = error_of("[broker]\nurl = \"amqp://u:p@n1/%2f,ftp://u:secret@n2/\"");
    assert!(bad.contains("broker.url: URL 2") && !bad.contains("secret"), "{bad}");
    let missing = error_of("[broker]\nca_file = \"/nonexistent/ca.pem\"");
    assert!(missing.contains("broker.ca_file: /nonexistent/ca.pem"), "{missing}");
    let alone = error_of("[broker]\nclient_cert_file = \"/etc/hostname\"");
    assert!(alone.contains("broker.client_key_file"), "{alone}");
}

#[test]
fn circuit_and_failure_notice_options() {
    let c = Config::parse("[deliverer]\ncircuit_failures = 3\n", None).unwrap();
    assert_eq!(c.deliverer.circuit_failures, 3);
    let text = "[[integrations]]\nid = \"g\"\nteam_id = \"T\"\nchannel = \"C1\"\nurls = [\"https://example.com/\"]\ntoken = \"t\"\n";
    let i = &Config::parse(text, None).unwrap().integrations.list[0];
    assert_eq!(
        (i.circuit_failures, i.on_failure),
        (DEFAULT_CIRCUIT_FAILURES, OnFailure::Quiet)
    );
    assert_eq!(i.failure_notice_interval, Duration::from_secs(300));
    let notify = format!("{text}circuit_failures = 0\non_failure = \"notify\"\nfailure_notice_interval_s = 60\n");
    let i = &Config::parse(&notify, None).unwrap().integrations.list[0];
    assert_eq!((i.circuit_failures, i.on_failure), (0, OnFailure::Notify));
    assert_eq!(i.failure_notice_interval, Duration::from_secs(60));
    let loud = error_of(&format!("{text}on_failure = \"loud\"\n"));
    assert!(
        loud.contains("on_failure") && loud.contains("quiet") && loud.contains("notify"),
        "{loud}"
    );
    assert!(error_of(&format!("{text}failure_notice_interval_s = 0\n")).contains("failure_notice_interval_s"));
}

#[test]
fn the_log_table() {
    let c = Config::parse("", None).unwrap();
    assert_eq!(c.log, LogConfig::default());
    assert_eq!(c.delivery_log, DeliveryLogConfig::default());
    assert!(c.warnings.is_empty());
    let expected = DeliveryLogConfig {
        enabled: false,
        max_age: Duration::from_secs(2 * 86400),
        max_bytes: 10 << 20,
    };
    let c = Config::parse(
        "[delivery_log]\nenabled = false\nmax_age = \"2d\"\nmax_bytes = \"10MiB\"\n",
        None,
    )
    .unwrap();
    assert_eq!(c.delivery_log, expected);
    assert!(c.warnings.is_empty());
    // A file from before [delivery_log] existed: read, with a warning.
    let c = Config::parse(
        "[log]\nformat = \"json\"\nenabled = false\nmax_age = \"2d\"\nmax_bytes = \"10MiB\"\n",
        None,
    )
    .unwrap();
    assert_eq!(c.delivery_log, expected);
    assert_eq!(c.log.format, LogFormat::Json);
    assert_eq!(c.warnings.len(), 1, "{:?}", c.warnings);
    assert!(c.warnings[0].contains("[delivery_log]"), "{:?}", c.warnings);
    assert!(
        error_of("[log]\nenabled = false\n[delivery_log]\nenabled = true")
            .contains("belong to [delivery_log]; give them there only")
    );
    assert_eq!(
        Config::parse("[delivery_log]\nmax_bytes = 4096\n", None)
            .unwrap()
            .delivery_log
            .max_bytes,
        4096
    );
    assert!(
        error_of("[delivery_log]\nmax_age = \"soon\"").contains("delivery_log.max_age: \"soon\" is not a duration")
    );
    assert!(error_of("[log]\nmax_age = \"soon\"").contains("log.max_age: \"soon\" is not a duration"));
    assert!(error_of("[delivery_log]\nmax_bytes = \"1 TB\"").contains("delivery_log.max_bytes"));
    assert!(error_of("[delivery_log]\nmax_bytes = 0").contains("delivery_log.max_bytes: must be more than 0"));
    assert!(error_of("[log]\nretention = 1").contains("log.retention: unknown field"));
}

/// The fields a table knows, as its unknown-field error lists them.
fn known_fields(table_path: &str, integration: bool) -> Vec<String> {
    let text = if integration {
        "[[integrations]]\nid = \"x\"\nzzzzzzzzzzzz_probe = 1\n".to_owned()
    } else if table_path.is_empty() {
        "zzzzzzzzzzzz_probe = 1\n".to_owned()
    } else {
        format!("[{table_path}]\nzzzzzzzzzzzz_probe = 1\n")
    };
    let error = error_of(&text);
    let list = error
        .split_once("the known fields are ")
        .unwrap_or_else(|| panic!("{table_path}: no list of known fields in {error:?}"))
        .1;
    list.split('`').skip(1).step_by(2).map(str::to_owned).collect()
}

#[test]
fn the_configuration_reference_names_every_field_and_the_example() {
    let reference = include_str!("../../../docs/configuration.md");
    let named = |field: &str| {
        [
            format!("`{field}`"),
            format!("`{field} ="),
            format!("`[{field}]`"),
            format!("`[[{field}]]`"),
        ]
        .iter()
        .any(|shown| reference.contains(shown.as_str()))
    };
    let mut missing = Vec::new();
    let tables = [
        "",
        "broker",
        "matcher",
        "deliverer",
        "responder",
        "log",
        "delivery_log",
        "ingress",
        "ingress.slack",
        "ingress.matrix",
    ];
    for table in tables {
        for field in known_fields(table, false) {
            let subtable = format!("`[{table}.{field}]`");
            if !named(&field) && !reference.contains(&subtable) {
                missing.push(format!("[{table}] {field}"));
            }
        }
    }
    for field in known_fields("integrations", true) {
        if !named(&field) {
            missing.push(format!("[[integrations]] {field}"));
        }
    }
    // Every key the example file sets, at any depth.
    fn keys(value: &toml::Value, out: &mut Vec<String>) {
        match value {
            toml::Value::Table(t) => {
                for (k, v) in t {
                    out.push(k.clone());
                    keys(v, out);
                }
            }
            toml::Value::Array(a) => a.iter().for_each(|v| keys(v, out)),
            _ => {}
        }
    }
    let example: toml::Value = toml::from_str(include_str!("../../../deploy/example.toml")).unwrap();
    let mut example_keys = Vec::new();
    keys(&example, &mut example_keys);
    for key in example_keys {
        if !named(&key) {
            missing.push(format!("deploy/example.toml: {key}"));
        }
    }
    assert!(
        missing.is_empty(),
        "docs/configuration.md does not name (in backticks): {missing:?}"
    );
}
