//! Cloudflare's wire format as this adapter reads it: the response envelope and the answers
//! of each endpoint, the reason a failure gives (the envelope's errors quoted), and how long a
//! `Retry-After` asks to wait.

use std::time::Duration;

use reqwest::{header, StatusCode};
use serde::Deserialize;

use crate::ports::{ListedKey, PortError};

/// Cloudflare's response envelope.
#[derive(Deserialize, Default)]
pub(super) struct Envelope {
    #[serde(default)]
    pub(super) success: bool,
    #[serde(default)]
    pub(super) errors: Vec<EnvelopeError>,
    #[serde(default)]
    pub(super) result: Option<BulkResult>,
}

#[derive(Deserialize)]
pub(super) struct EnvelopeError {
    pub(super) code: Option<i64>,
    pub(super) message: Option<String>,
}

/// `GET /keys`: one page of names, and the cursor of the next page ("" at the end).
#[derive(Deserialize)]
pub(super) struct ListAnswer {
    #[serde(default)]
    pub(super) result: Vec<ListedKey>,
    #[serde(default)]
    pub(super) result_info: Option<ResultInfo>,
}

#[derive(Deserialize)]
pub(super) struct ResultInfo {
    #[serde(default)]
    pub(super) cursor: Option<String>,
}

/// `POST /bulk/get` with `type: text`: each key's value, `null` when absent.
#[derive(Deserialize)]
pub(super) struct BulkGetAnswer {
    pub(super) result: BulkGetResult,
}

#[derive(Deserialize)]
pub(super) struct BulkGetResult {
    pub(super) values: std::collections::HashMap<String, Option<String>>,
}

#[derive(Deserialize, Default)]
pub(super) struct BulkResult {
    #[serde(default)]
    pub(super) unsuccessful_keys: Vec<String>,
}

pub(super) fn describe(status: StatusCode, body: &str) -> String {
    let envelope: Envelope = serde_json::from_str(body).unwrap_or_default();
    let errors: Vec<String> = envelope
        .errors
        .iter()
        .map(|e| {
            format!(
                "{} {}",
                e.code.map(|c| c.to_string()).unwrap_or_default(),
                e.message.as_deref().unwrap_or("")
            )
            .trim()
            .to_owned()
        })
        .collect();
    if errors.is_empty() {
        format!("HTTP {}", status.as_u16())
    } else {
        format!("HTTP {} ({})", status.as_u16(), errors.join("; "))
    }
}

/// The longest wait a server can ask for: Cloudflare's lockout lasts 5 minutes, so a longer
/// `Retry-After` (a year, a date in 9999) is a fault that must not silence a warm container.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(300);

/// How long the server asks us to wait: Cloudflare's `retry-after-ms`, or `Retry-After` as
/// seconds or as an HTTP date (both forms RFC 9110 allows); at most [`MAX_RETRY_AFTER`].
pub(super) fn retry_after(headers: &header::HeaderMap) -> Option<Duration> {
    let text = |name: &str| headers.get(name)?.to_str().ok().map(str::trim);
    let seconds = |value: &str, scale: f64| {
        let wait = value
            .parse::<f64>()
            .ok()
            .filter(|s| !s.is_nan() && *s >= 0.0)?;
        // Out of `Duration`'s range (1e20 s, infinity): as long as allowed, never a panic.
        Some(Duration::try_from_secs_f64(wait * scale).unwrap_or(MAX_RETRY_AFTER))
    };
    let wait = match text("retry-after-ms").and_then(|v| seconds(v, 0.001)) {
        Some(wait) => wait,
        None => {
            let value = text(header::RETRY_AFTER.as_str())?;
            seconds(value, 1.0).or_else(|| {
                let at = httpdate::parse_http_date(value).ok()?;
                Some(
                    at.duration_since(std::time::SystemTime::now())
                        .unwrap_or_default(),
                )
            })?
        }
    };
    Some(wait.min(MAX_RETRY_AFTER))
}

/// A final answer that is not a success: every kind transient, a 4xx included (`Refused`): a
/// whole request refused is more likely a misconfiguration fixed later than a fault of every
/// record in it (a key refused alone is told apart in [`CloudflareKv::send`]).
pub(super) fn refused(status: StatusCode, body: &str) -> PortError {
    if status.is_redirection() {
        return PortError::Refused(format!(
            "HTTP {} from Cloudflare: a redirect, not followed",
            status.as_u16()
        ));
    }
    match status {
        StatusCode::TOO_MANY_REQUESTS => PortError::Throttled(describe(status, body)),
        s if s.is_server_error() => PortError::Unavailable(describe(status, body)),
        _ => PortError::Refused(describe(status, body)),
    }
}

pub(super) fn transport_error(e: &reqwest::Error) -> String {
    if e.is_timeout() {
        "Cloudflare did not answer in time".into()
    } else if e.is_connect() {
        "cannot connect to Cloudflare".into()
    } else {
        format!("Cloudflare request failed: {e}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> header::HeaderMap {
        pairs
            .iter()
            .map(|(name, value)| {
                (
                    header::HeaderName::from_static(name),
                    header::HeaderValue::from_str(value).unwrap(),
                )
            })
            .collect()
    }

    #[test]
    fn retry_after_is_read_in_every_form_and_capped_never_panicking() {
        let wait = |pairs: &[(&'static str, &str)]| retry_after(&headers(pairs));
        assert_eq!(wait(&[("retry-after", "7")]), Some(Duration::from_secs(7)));
        assert_eq!(
            wait(&[("retry-after-ms", "1500"), ("retry-after", "9")]),
            Some(Duration::from_millis(1500))
        );
        let soon = httpdate::fmt_http_date(std::time::SystemTime::now() + Duration::from_secs(30));
        assert!(wait(&[("retry-after", &soon)]).is_some_and(|w| w <= Duration::from_secs(30)));
        for huge in [
            &[("retry-after", "1e20")][..],
            &[("retry-after-ms", "1e25")],
            &[("retry-after", "inf")],
            &[("retry-after", "31536000")],
            &[("retry-after", "Fri, 31 Dec 9999 23:59:59 GMT")],
        ] {
            assert_eq!(wait(huge), Some(MAX_RETRY_AFTER), "{huge:?}");
        }
        for nonsense in ["-1", "NaN", "soon", ""] {
            assert_eq!(wait(&[("retry-after", nonsense)]), None, "{nonsense}");
        }
    }

    #[test]
    fn failures_quote_cloudflare_s_envelope_and_never_follow_a_redirect() {
        let body = r#"{"success": false, "errors": [{"code": 10020, "message": "bad key"}]}"#;
        assert_eq!(
            describe(StatusCode::BAD_REQUEST, body),
            "HTTP 400 (10020 bad key)"
        );
        assert_eq!(describe(StatusCode::BAD_GATEWAY, "<html>"), "HTTP 502");
        let redirect = refused(StatusCode::TEMPORARY_REDIRECT, "");
        assert!(
            matches!(&redirect, PortError::Refused(r) if r.contains("HTTP 307") && r.contains("redirect"))
        );
        // Every final answer is retried; what kind of failure it was is said by its variant.
        let (throttled, down) = (StatusCode::TOO_MANY_REQUESTS, StatusCode::BAD_GATEWAY);
        assert!(matches!(refused(throttled, body), PortError::Throttled(_)));
        assert!(matches!(refused(down, "<html>"), PortError::Unavailable(_)));
        let bad = refused(StatusCode::BAD_REQUEST, body);
        assert!(matches!(bad, PortError::Refused(_)) && bad.is_transient());
    }
}
