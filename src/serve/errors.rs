//! Every way a request can fail, and the one place that maps each to an HTTP status.
//!
//! As in text-embeddings-inference: handlers return [`ServeError`]; its [`ErrorType`]
//! decides the status (`impl From<&ErrorType> for StatusCode`), and the body is always
//! an [`ErrorResponse`]: `{"error": "...", "error_type": "...", "field": ..., "limit": ...}`.
//! `field` names the part of the request at fault (`"body"`, `"texts"`, `"texts[3]"`,
//! `"examples[0]"`) and `limit` the limit it broke, when there is one.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};

use crate::labeler::LabelerError;

/// Seconds a client is asked to wait after a 503 for a full queue.
pub const RETRY_AFTER_SECS: u64 = 1;

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The body is not JSON at all.
    #[error("the request body is not valid JSON: {0}")]
    MalformedJson(String),
    /// The body could not be read (the client went away, a broken chunk).
    #[error("cannot read the request body: {0}")]
    BadBody(String),
    #[error("the request body is larger than {limit} bytes (--max-body-bytes)")]
    BodyTooLarge { limit: usize },
    #[error("{field}: {count} items, more than the limit of {limit} per request (--max-texts)")]
    TooMany { field: String, count: usize, limit: usize },
    #[error("{field}: {chars} characters, more than the limit of {limit} (--max-text-chars)")]
    TextTooLong { field: String, chars: usize, limit: usize },
    #[error("{field}: {tokens} tokens, more than the model's limit of {limit}")]
    TooManyTokens { field: String, tokens: usize, limit: usize },
    /// Well-formed JSON that is not a valid request.
    #[error("{field}: {message}")]
    Invalid { field: String, message: String },
    #[error("this endpoint needs the API key, in the `x-api-key` header or as `Authorization: Bearer KEY`")]
    Unauthorized,
    #[error("the server is busy: {capacity} requests are already waiting for the encoder; retry after {RETRY_AFTER_SECS} s")]
    Overloaded { capacity: usize },
    #[error("the server is shutting down")]
    ShuttingDown,
    #[error("no such endpoint: {0}")]
    NotFound(String),
    #[error("labeling failed: {0}")]
    Labeler(#[from] LabelerError),
    #[error("the examples were added in memory but the index could not be saved: {0}")]
    Save(nearspan_index::IndexError),
    #[error("internal error: {0}")]
    Internal(String),
}

/// The class of an error: decides the status code and is sent as `error_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorType {
    /// 400: not JSON, or an unreadable body.
    MalformedJson,
    /// 413: over a size limit (body bytes, items per request).
    PayloadTooLarge,
    /// 422: valid JSON that breaks the request's rules (a field, a text's length).
    Validation,
    /// 401: a write without the API key.
    Unauthorized,
    /// 503 with Retry-After: the batcher's queue is full.
    Overloaded,
    /// 503: shutting down.
    Unavailable,
    /// 404.
    NotFound,
    /// 500.
    Internal,
}

impl From<&ErrorType> for StatusCode {
    fn from(t: &ErrorType) -> Self {
        match t {
            ErrorType::MalformedJson => StatusCode::BAD_REQUEST,
            ErrorType::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ErrorType::Validation => StatusCode::UNPROCESSABLE_ENTITY,
            ErrorType::Unauthorized => StatusCode::UNAUTHORIZED,
            ErrorType::Overloaded | ErrorType::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            ErrorType::NotFound => StatusCode::NOT_FOUND,
            ErrorType::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

/// The JSON body of every error response.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorResponse {
    pub error: String,
    pub error_type: ErrorType,
    /// The part of the request at fault, e.g. `texts[2]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    /// The limit that was exceeded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<usize>,
}

impl ServeError {
    pub fn error_type(&self) -> ErrorType {
        match self {
            ServeError::MalformedJson(_) | ServeError::BadBody(_) => ErrorType::MalformedJson,
            ServeError::BodyTooLarge { .. } | ServeError::TooMany { .. } => ErrorType::PayloadTooLarge,
            ServeError::TextTooLong { .. } | ServeError::TooManyTokens { .. } | ServeError::Invalid { .. } => {
                ErrorType::Validation
            }
            ServeError::Labeler(LabelerError::ReservedLabel { .. }) => ErrorType::Validation,
            ServeError::Unauthorized => ErrorType::Unauthorized,
            ServeError::Overloaded { .. } => ErrorType::Overloaded,
            ServeError::ShuttingDown => ErrorType::Unavailable,
            ServeError::NotFound(_) => ErrorType::NotFound,
            ServeError::Labeler(_) | ServeError::Save(_) | ServeError::Internal(_) => ErrorType::Internal,
        }
    }

    /// The part of the request at fault, if the error is about one.
    pub fn field(&self) -> Option<&str> {
        match self {
            ServeError::MalformedJson(_) | ServeError::BadBody(_) | ServeError::BodyTooLarge { .. } => Some("body"),
            ServeError::TooMany { field, .. }
            | ServeError::TextTooLong { field, .. }
            | ServeError::TooManyTokens { field, .. }
            | ServeError::Invalid { field, .. } => Some(field),
            _ => None,
        }
    }

    /// The limit the request broke, if any.
    pub fn limit(&self) -> Option<usize> {
        match self {
            ServeError::BodyTooLarge { limit }
            | ServeError::TooMany { limit, .. }
            | ServeError::TextTooLong { limit, .. }
            | ServeError::TooManyTokens { limit, .. } => Some(*limit),
            ServeError::Overloaded { capacity } => Some(*capacity),
            _ => None,
        }
    }

    pub fn to_response(&self) -> ErrorResponse {
        ErrorResponse {
            error: self.to_string(),
            error_type: self.error_type(),
            field: self.field().map(str::to_string),
            limit: self.limit(),
        }
    }
}

impl IntoResponse for ServeError {
    fn into_response(self) -> Response {
        let error_type = self.error_type();
        if error_type == ErrorType::Internal {
            tracing::error!(error = %self, "request failed");
        }
        let mut response = (StatusCode::from(&error_type), axum::Json(self.to_response())).into_response();
        let headers = response.headers_mut();
        match error_type {
            ErrorType::Overloaded => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECS));
            }
            ErrorType::Unauthorized => {
                headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            _ => {}
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_class_has_its_status() {
        let cases = [
            (ServeError::MalformedJson("x".into()), 400),
            (ServeError::BodyTooLarge { limit: 10 }, 413),
            (ServeError::TooMany { field: "texts".into(), count: 9, limit: 8 }, 413),
            (ServeError::TextTooLong { field: "texts[0]".into(), chars: 9, limit: 8 }, 422),
            (ServeError::Invalid { field: "texts".into(), message: "missing".into() }, 422),
            (ServeError::Unauthorized, 401),
            (ServeError::Overloaded { capacity: 4 }, 503),
            (ServeError::ShuttingDown, 503),
            (ServeError::Internal("x".into()), 500),
        ];
        for (err, status) in cases {
            assert_eq!(StatusCode::from(&err.error_type()).as_u16(), status, "{err}");
        }
    }

    #[test]
    fn error_body_names_field_and_limit() {
        let e = ServeError::TextTooLong { field: "texts[2]".into(), chars: 300, limit: 200 };
        let body = serde_json::to_value(e.to_response()).unwrap();
        assert_eq!(body["error_type"], "validation");
        assert_eq!(body["field"], "texts[2]");
        assert_eq!(body["limit"], 200);
        assert!(body["error"].as_str().unwrap().contains("--max-text-chars"));
    }

    #[test]
    fn overloaded_sets_retry_after() {
        let r = ServeError::Overloaded { capacity: 1 }.into_response();
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(r.headers()[header::RETRY_AFTER], "1");
    }
}
