//! Time to match one event against 10, 10,000 and 100,000 integrations.
//! `cargo bench -p swallow-matcher`

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use std::hint::black_box;
use swallow_matcher::IntegrationIndex;
use swallow_shared::{ChatEvent, Config};

/// `n` integrations over `n / per_team` teams: half channel-only, a quarter
/// trigger-only (prefix), a quarter both; the event matches exactly one
/// trigger-only one.
fn config(n: usize, per_team: usize) -> Config {
    let mut text = String::new();
    for i in 0..n {
        let team = i / per_team;
        let body = match i % 4 {
            0 | 1 => format!("channel = \"C{i}\""),
            2 => format!("trigger_words = [\"bot{i}:\", \"b{i}\"]"),
            _ => format!("channel = \"#chan{i}\"\ntrigger_words = [\"hey{i}\"]\ntrigger_match = \"word\""),
        };
        text.push_str(&format!(
            "[[integrations]]\nid = \"i{i}\"\nteam_id = \"T{team}\"\n{body}\nurls = [\"http://127.0.0.1:9/\"]\ntoken = \"t\"\n"
        ));
    }
    Config::parse(&text, None).expect("bench config is valid")
}

fn event() -> ChatEvent {
    // Integration 2 (team T0) is trigger-only with word "bot2:".
    serde_json::from_str(
        r#"{"team_id":"T0","channel_id":"C999999999","channel_name":"general","user_id":"U1",
            "ts":"1355517523.000005","text":"bot2: What is the air-speed velocity of an unladen swallow?"}"#,
    )
    .unwrap()
}

fn matching(c: &mut Criterion) {
    bench_group(c, "match_event", 10);
    // The worst case for an index: every integration in the event's team.
    bench_group(c, "match_event_one_team", usize::MAX);
}

fn bench_group(c: &mut Criterion, name: &str, per_team: usize) {
    let mut group = c.benchmark_group(name);
    for n in [10usize, 10_000, 100_000] {
        let config = config(n, per_team);
        let index = IntegrationIndex::new(&config.integrations);
        let e = event();
        assert_eq!(index.match_event(&e).unwrap().len(), 1);
        group.bench_with_input(BenchmarkId::from_parameter(n), &e, |b, e| {
            b.iter(|| index.match_event(black_box(e)))
        });
    }
    group.finish();
}

criterion_group!(benches, matching);
criterion_main!(benches);
