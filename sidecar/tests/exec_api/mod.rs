//! A client of the exec API (`POST /v1/exec`) for tests of the exec server and the dispatcher,
//! which serve the same API.
#![allow(clippy::unwrap_used, dead_code)]

use axum::body::Body;
use axum::http::{header, Request, StatusCode};
use serde_json::Value;
use tower::ServiceExt;

/// Sends `body` to `app`: the status, the Retry-After header and the JSON answer.
pub async fn call(app: &axum::Router, body: Value) -> (StatusCode, Option<String>, Value) {
    call_raw(app, body.to_string()).await
}

/// Like [`call`], with a body that need not be JSON.
pub async fn call_raw(app: &axum::Router, body: String) -> (StatusCode, Option<String>, Value) {
    let request = Request::post("/v1/exec")
        .header("content-type", "application/json")
        .body(Body::from(body))
        .unwrap();
    let response = app.clone().oneshot(request).await.unwrap();
    let status = response.status();
    let retry = response
        .headers()
        .get(header::RETRY_AFTER)
        .map(|v| v.to_str().unwrap().to_owned());
    let bytes = axum::body::to_bytes(response.into_body(), 1 << 20)
        .await
        .unwrap();
    (status, retry, serde_json::from_slice(&bytes).unwrap())
}
