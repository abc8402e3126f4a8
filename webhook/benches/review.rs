//! Review cost in process, without sockets: a realistic agent Deployment with the shipped
//! policies through `/mutate` and `/validate`, the fast path for a non-agent pod, and the pieces
//! (policy decision, patch) on their own.
//!
//! Run: `cargo bench -p agentvm-webhook --bench review`

#![allow(clippy::panic, clippy::unwrap_used, clippy::expect_used)] // a benchmark may abort on bad fixtures

use agentvm_webhook::admission::{Mode, Reviewer};
use agentvm_webhook::offline;
use agentvm_webhook::policies::Policies;
use criterion::{criterion_group, criterion_main, Criterion};
use std::hint::black_box;

// The same allocator as the `agentvm` binary, so that the figures match the server's.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn document(path: &str) -> offline::Document {
    let full = format!("{}/../{path}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&full).unwrap_or_else(|e| panic!("{full}: {e}"));
    offline::parse_documents(path, &text)
        .unwrap_or_else(|e| panic!("{e}"))
        .remove(0)
}

fn bench(c: &mut Criterion) {
    let reviewer = Reviewer::fixed(Policies::shipped().unwrap_or_else(|e| panic!("{e}")));
    let deployment = document("examples/agent-deployment.yaml");
    let reviewed = offline::review_document(&reviewer, &deployment);
    let mut patched = deployment.request.clone();
    patched.raw["object"] = reviewed.patched.unwrap_or_else(|| panic!("example denied"));
    let plain = document("tests/fixtures/captures/pod-create-non-agent.mutate.json");

    c.bench_function("mutate agent deployment", |b| {
        b.iter(|| reviewer.review(Mode::Mutate, black_box(&deployment.request)))
    });
    c.bench_function("validate patched agent deployment", |b| {
        b.iter(|| reviewer.review(Mode::Validate, black_box(&patched)))
    });
    c.bench_function("mutate non-agent pod (fast path)", |b| {
        b.iter(|| reviewer.review(Mode::Mutate, black_box(&plain.request)))
    });
    let body = serde_json::json!({
        "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": deployment.request.raw,
    })
    .to_string();
    c.bench_function("parse + mutate + encode (server work per review)", |b| {
        b.iter(|| {
            let req = agentvm_webhook::review::parse(black_box(body.as_bytes()))
                .unwrap_or_else(|e| panic!("{e}"));
            reviewer
                .review(Mode::Mutate, &req)
                .response
                .to_review()
                .to_string()
        })
    });
}

criterion_group!(benches, bench);

fn pieces(c: &mut Criterion) {
    let policies = Policies::shipped().unwrap();
    let deployment = document("examples/agent-deployment.yaml");
    let object = deployment.request.object().cloned().unwrap();
    let template = &object["spec"]["template"];
    let input = serde_json::json!({
        "request": deployment.request.raw, "action": "admit",
        "pod": {"metadata": template["metadata"], "spec": template["spec"]},
        "workload": {"kind": "Deployment"}, "target": null,
    });
    c.bench_function("policy decision alone", |b| {
        b.iter(|| policies.decide(black_box(input.clone())))
    });
    c.bench_function("input conversion to regorus", |b| {
        b.iter(|| regorus::Value::from(black_box(input.clone())))
    });
}

criterion_group!(parts, pieces);
criterion_main!(benches, parts);
