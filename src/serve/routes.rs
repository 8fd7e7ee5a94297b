//! The HTTP routes: the JSON API under `/v1`, health and metrics, and the playground's
//! static files (embedded in the binary: no CDN, works offline).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, FailedToBufferBody};
use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State as AxumState};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};

use super::errors::ServeError;
use super::State;
use crate::data::Example;

type S = AxumState<Arc<State>>;

const INDEX_HTML: &str = include_str!("static/index.html");
const APP_JS: &str = include_str!("static/app.js");
const STYLE_CSS: &str = include_str!("static/style.css");

pub(super) fn router(state: Arc<State>) -> Router {
    let mut router = Router::new()
        .route("/", get(index_html))
        .route("/app.js", get(app_js))
        .route("/style.css", get(style_css))
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .route("/v1/index", get(index_info))
        .route("/v1/parse", post(parse))
        .route("/v1/examples", post(add_examples))
        .fallback(not_found)
        // Bodies are read with this limit; our handlers turn the rejection into a JSON 413.
        .layer(DefaultBodyLimit::max(state.limits.max_body_bytes))
        .layer(middleware::from_fn_with_state(state.clone(), track));
    if !state.cors_origins.is_empty() {
        router = router.layer(cors(&state.cors_origins));
    }
    router.with_state(state)
}

/// Checks a `--cors-origin` value up front.
pub(super) fn check_origin(origin: &str) -> anyhow::Result<()> {
    if origin != "*" && HeaderValue::from_str(origin).is_err() {
        anyhow::bail!("--cors-origin {origin:?} is not a valid origin (e.g. http://localhost:3000 or *)");
    }
    Ok(())
}

fn cors(origins: &[String]) -> tower_http::cors::CorsLayer {
    use tower_http::cors::{AllowOrigin, CorsLayer};
    let allow = if origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(origins.iter().filter_map(|o| HeaderValue::from_str(o).ok()))
    };
    CorsLayer::new()
        .allow_origin(allow)
        .allow_methods([Method::GET, Method::POST])
        .allow_headers([header::CONTENT_TYPE, header::AUTHORIZATION, header::HeaderName::from_static("x-api-key")])
}

/// Counts, times and tracks every request by its route (not its raw path, so that
/// unknown paths cannot grow the metrics without bound).
async fn track(AxumState(state): S, request: Request, next: Next) -> Response {
    let route = request.extensions().get::<MatchedPath>().map_or("other", MatchedPath::as_str).to_string();
    let start = Instant::now();
    state.metrics.request_started(&route);
    let response = next.run(request).await;
    state.metrics.request_finished(&route, response.status().as_u16(), start.elapsed());
    response
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    let mut r = body.into_response();
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    r
}

async fn index_html() -> Response {
    let mut r = asset("text/html; charset=utf-8", INDEX_HTML);
    // Everything the page needs comes from this server.
    r.headers_mut().insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static("default-src 'self'; img-src 'self' data:; frame-ancestors 'none'"),
    );
    r
}

async fn app_js() -> Response {
    asset("text/javascript; charset=utf-8", APP_JS)
}

async fn style_css() -> Response {
    asset("text/css; charset=utf-8", STYLE_CSS)
}

async fn healthz() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

async fn metrics(AxumState(state): S) -> Response {
    let text = state.metrics.render(state.batcher.depth(), state.batcher.capacity(), state.gauges());
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], text).into_response()
}

async fn not_found(request: Request) -> ServeError {
    ServeError::NotFound(format!("{} {}", request.method(), request.uri().path()))
}

async fn index_info(AxumState(state): S) -> Json<Value> {
    let index = super::read(&state.index);
    let e = index.encoder();
    let mut intents: BTreeMap<&str, usize> = BTreeMap::new();
    for i in 0..index.n_examples() {
        if let Some(intent) = index.example(nearspan_index::ExampleId(i as u32)).intent.as_deref() {
            *intents.entry(intent).or_default() += 1;
        }
    }
    Json(json!({
        "path": state.index_path,
        "format_version": index.format_version(),
        "examples": index.n_examples(),
        "spans": index.n_spans(),
        "labels": index.labels().collect::<Vec<_>>(),
        "slot_labels": index.labels().filter(|l| *l != crate::labeler::O_LABEL).collect::<Vec<_>>(),
        "intents": intents,
        "encoder": {"model": e.model_id, "revision": e.revision, "pooling": e.pooling, "max_width": e.max_width, "dim": e.dim},
        "backend": index.backend().to_string(),
        "o_spans": index.label_id(crate::labeler::O_LABEL).is_some(),
        "writes_need_key": state.api_key.is_some(),
    }))
}

/// The body as JSON: 413 over the size limit, 400 when it is not JSON.
fn json_body(body: Result<Bytes, BytesRejection>, limit: usize) -> Result<Value, ServeError> {
    let bytes = body.map_err(|rejection| match rejection {
        BytesRejection::FailedToBufferBody(FailedToBufferBody::LengthLimitError(_)) => ServeError::BodyTooLarge { limit },
        other => ServeError::BadBody(other.body_text()),
    })?;
    serde_json::from_slice(&bytes).map_err(|e| ServeError::MalformedJson(e.to_string()))
}

/// The one array field `name` of a request object; any other field is an error (a typo
/// is caught, not ignored).
fn only_array<'a>(body: &'a Value, name: &str) -> Result<&'a Vec<Value>, ServeError> {
    let invalid = |field: &str, message: String| ServeError::Invalid { field: field.to_string(), message };
    let object = body.as_object().ok_or_else(|| invalid("body", format!("expected a JSON object {{\"{name}\": [...]}}")))?;
    if let Some(other) = object.keys().find(|k| *k != name) {
        return Err(invalid(other, format!("unknown field; the only field is \"{name}\"")));
    }
    object
        .get(name)
        .ok_or_else(|| invalid(name, "missing field".into()))?
        .as_array()
        .ok_or_else(|| invalid(name, "expected an array".into()))
}

/// Checks one text against the length limits (characters, then the model's tokens).
fn check_text(state: &State, field: &str, text: &str) -> Result<(), ServeError> {
    let chars = text.chars().count();
    if chars > state.limits.max_text_chars {
        return Err(ServeError::TextTooLong { field: field.to_string(), chars, limit: state.limits.max_text_chars });
    }
    if text.trim().is_empty() {
        return Err(ServeError::Invalid { field: field.to_string(), message: "empty text".into() });
    }
    let tokens = state.encoder.tokenize(text).map_err(|e| ServeError::Invalid { field: field.to_string(), message: e.to_string() })?;
    let limit = state.encoder.info().max_tokens;
    if tokens.len() > limit {
        return Err(ServeError::TooManyTokens { field: field.to_string(), tokens: tokens.len(), limit });
    }
    Ok(())
}

fn check_count(state: &State, field: &str, count: usize) -> Result<(), ServeError> {
    let limit = state.limits.max_texts;
    if count > limit {
        return Err(ServeError::TooMany { field: field.to_string(), count, limit });
    }
    Ok(())
}

/// `POST /v1/parse {"texts": [...]}` → `{"results": [prediction, ...]}`.
async fn parse(AxumState(state): S, body: Result<Bytes, BytesRejection>) -> Result<Json<Value>, ServeError> {
    let body = json_body(body, state.limits.max_body_bytes)?;
    let items = only_array(&body, "texts")?;
    check_count(&state, "texts", items.len())?;
    let mut texts = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let field = format!("texts[{i}]");
        let text = item.as_str().ok_or_else(|| ServeError::Invalid { field: field.clone(), message: "expected a string".into() })?;
        check_text(&state, &field, text)?;
        texts.push(text.to_string());
    }
    let results = state.batcher.submit(texts).await?;
    Ok(Json(json!({ "results": results })))
}

/// Whether the request carries the API key (always true when none is set).
fn authorized(state: &State, headers: &HeaderMap) -> bool {
    let Some(key) = &state.api_key else { return true };
    let given = headers.get("x-api-key").and_then(|v| v.to_str().ok()).or_else(|| {
        headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer ")).map(str::trim)
    });
    given.is_some_and(|g| constant_time_eq(g.as_bytes(), key.as_bytes()))
}

/// Compares without returning early at the first difference.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// One example of a request, validated as a JSONL line is, plus the server's limits.
fn parse_one_example(state: &State, i: usize, item: &Value) -> Result<Example, ServeError> {
    let field = format!("examples[{i}]");
    if !item.is_object() {
        return Err(ServeError::Invalid { field, message: "expected a JSON object {\"text\": ...}".into() });
    }
    let example = crate::data::jsonl::parse_example(Path::new(&field), &item.to_string()).map_err(|e| {
        // The reader's messages name a file and a line; here the field is the place.
        let message = e.to_string();
        let message = message.strip_prefix(&format!("{field}: ")).unwrap_or(&message);
        let message = message.strip_prefix("line 1: ").or_else(|| message.strip_prefix("line 1, ")).unwrap_or(message);
        ServeError::Invalid { field: field.clone(), message: message.to_string() }
    })?;
    check_text(state, &format!("{field}.text"), &example.text)?;
    if let Some(s) = example.spans.iter().find(|s| s.label == crate::labeler::O_LABEL) {
        let message = format!("span {}..{} uses the reserved non-slot label \"O\"", s.start, s.end);
        return Err(ServeError::Invalid { field: format!("{field}.spans"), message });
    }
    if example.intent.as_deref().is_some_and(|i| i.trim().is_empty()) {
        return Err(ServeError::Invalid { field: format!("{field}.intent"), message: "empty intent (leave it out for none)".into() });
    }
    Ok(example)
}

/// `POST /v1/examples {"examples": [JSONL example, ...]}`: adds them to the live index
/// and saves it before answering `{"added": n, "examples": total, "spans": total}`.
async fn add_examples(AxumState(state): S, headers: HeaderMap, body: Result<Bytes, BytesRejection>) -> Result<Response, ServeError> {
    if !authorized(&state, &headers) {
        return Err(ServeError::Unauthorized);
    }
    let body = json_body(body, state.limits.max_body_bytes)?;
    let items = only_array(&body, "examples")?;
    check_count(&state, "examples", items.len())?;
    let examples = items.iter().enumerate().map(|(i, item)| parse_one_example(&state, i, item)).collect::<Result<Vec<_>, _>>()?;
    let n = examples.len();
    let worker = state.clone();
    let summary = tokio::task::spawn_blocking(move || worker.add_examples(&examples))
        .await
        .map_err(|e| ServeError::Internal(format!("adding examples: {e}")))??;
    let body = json!({"added": n, "examples": summary.examples, "spans": summary.spans});
    Ok((StatusCode::OK, Json(body)).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_compare_whole() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secret2"));
    }

    #[test]
    fn request_fields_are_named() {
        let field = |v: Value| match only_array(&v, "texts") {
            Err(ServeError::Invalid { field, .. }) => field,
            other => panic!("{other:?}"),
        };
        assert_eq!(field(json!({"txts": []})), "txts");
        assert_eq!(field(json!({})), "texts");
        assert_eq!(field(json!({"texts": "x"})), "texts");
        assert_eq!(field(json!([1])), "body");
        assert!(only_array(&json!({"texts": ["a"]}), "texts").is_ok());
    }
}
