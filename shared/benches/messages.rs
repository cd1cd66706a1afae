//! Time to decode and encode the jobs that travel between the stages: what
//! the deliverer does to every delivery job and the responder to every reply
//! (decode), what the matcher does per job and the deliverer per reply
//! (encode). The inputs are the version-1 fixtures of `tests/fixtures/v1`.
//! `cargo bench -p swallow-shared --bench messages`

use criterion::{Criterion, criterion_group, criterion_main};
use std::hint::black_box;
use swallow_shared::ChatEvent;
use swallow_shared::wire::messages::{DeliveryJob, ReplyJob};

fn fixture(name: &str) -> Vec<u8> {
    let path = format!("{}/tests/fixtures/v1/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read(&path).unwrap_or_else(|e| panic!("reading {path}: {e}"))
}

fn messages(c: &mut Criterion) {
    for name in ["delivery_fresh.json", "delivery_full.json"] {
        let bytes = fixture(name);
        c.bench_function(&format!("decode {name}"), |b| {
            b.iter(|| serde_json::from_slice::<DeliveryJob>(black_box(&bytes)).unwrap())
        });
        let job: DeliveryJob = serde_json::from_slice(&bytes).unwrap();
        c.bench_function(&format!("encode {name}"), |b| {
            b.iter(|| serde_json::to_vec(black_box(&job)).unwrap())
        });
    }
    // The matcher's per-job work: a new job for a parsed event, encoded.
    let job: DeliveryJob = serde_json::from_slice(&fixture("delivery_fresh.json")).unwrap();
    let event: ChatEvent = job.event.clone();
    c.bench_function("matcher: make and encode a job", |b| {
        b.iter(|| {
            DeliveryJob::encode_new(
                black_box(&event),
                &job.integration_id,
                0,
                &job.url,
                &job.trigger_word,
                job.retry.created_at_ms,
            )
        })
    });
    for name in ["reply_fresh.json", "reply_full.json"] {
        let bytes = fixture(name);
        c.bench_function(&format!("decode {name}"), |b| {
            b.iter(|| serde_json::from_slice::<ReplyJob>(black_box(&bytes)).unwrap())
        });
        let reply: ReplyJob = serde_json::from_slice(&bytes).unwrap();
        c.bench_function(&format!("encode {name}"), |b| {
            b.iter(|| serde_json::to_vec(black_box(&reply)).unwrap())
        });
    }
}

criterion_group!(benches, messages);
criterion_main!(benches);
