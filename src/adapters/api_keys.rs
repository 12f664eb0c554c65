//! The API keys service: one key per system account, fetched per (cell, account) from the URL
//! `API_KEYS_SERVICE_URL` names (docs/contract.md, "The API keys service"). The short cache
//! across warm invocations is the core's (`pipeline::api_key_cache`).

use std::time::Duration;

use reqwest::{StatusCode, Url};
use serde::Deserialize;

use crate::domain::validate::{cut, is_dns_label, path_segment_problem, shown};
use crate::domain::AccountCell;
use crate::domain::ApiKey;
use crate::ports::{ApiKeySource, PortError};

/// `API_KEYS_SERVICE_URL`: an http(s) URL in which `{cell}` may stand for one whole label of
/// the host or one whole path segment, and nowhere else. The request always goes to the host
/// it names: a cell fills a host label only when it is a DNS label, and a path segment only
/// percent-encoded; the account id is one percent-encoded segment.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiKeysUrl {
    template: String,
    cell_in_host: bool,
}

/// Stands for `{cell}` while the template is parsed: lower-case, so hosts keep it as it is.
pub(crate) const CELL: &str = "cell0placeholder0";

impl ApiKeysUrl {
    pub fn parse(template: &str) -> Result<Self, String> {
        let url = Url::parse(&template.replace("{cell}", CELL)).map_err(|e| e.to_string())?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(format!("scheme `{}`, not http(s)", url.scheme()));
        }
        let host = url.host_str().filter(|h| !h.is_empty()).ok_or("no host")?;
        let whole = |part: &str, separator: char| {
            part.split(separator)
                .all(|piece| piece == CELL || !piece.contains(CELL))
        };
        let elsewhere = [
            url.username(),
            url.password().unwrap_or(""),
            url.query().unwrap_or(""),
        ]
        .iter()
        .chain(&[url.fragment().unwrap_or("")])
        .any(|part| part.contains(CELL));
        if elsewhere || !whole(host, '.') || !whole(url.path(), '/') {
            return Err(
                "`{cell}` may stand only for a whole label of the host or a whole path segment"
                    .into(),
            );
        }
        Ok(Self {
            template: template.to_owned(),
            cell_in_host: host.contains(CELL),
        })
    }

    /// `{template with the cell}/accounts/{account}/api-key`, or why the record cannot name one.
    pub fn for_account(&self, wanted: &AccountCell) -> Result<Url, String> {
        let cell = &wanted.cell;
        if self.cell_in_host && !is_dns_label(cell) {
            return Err(format!(
                "cell {} is not a DNS label (lower-case letters, digits, hyphens)",
                shown(cell)
            ));
        }
        for (what, value) in [("cell", cell), ("account id", &wanted.account)] {
            if let Some(problem) = path_segment_problem(value) {
                return Err(format!("{what} {problem}"));
            }
        }
        let filled = match self.cell_in_host {
            true => cell.clone(),
            false => encoded_segment(cell),
        };
        let mut url = Url::parse(&self.template.replace("{cell}", &filled))
            .map_err(|e| format!("API_KEYS_SERVICE_URL for cell {}: {e}", shown(cell)))?;
        url.path_segments_mut()
            .map_err(|_| "API_KEYS_SERVICE_URL is not an http(s) URL".to_string())?
            .pop_if_empty()
            // `push` percent-encodes the account id as one path segment.
            .push("accounts")
            .push(&wanted.account)
            .push("api-key");
        Ok(url)
    }
}

/// A value percent-encoded as one path segment (`/`, `?`, `#`, `%` and the rest escaped).
fn encoded_segment(value: &str) -> String {
    let mut url = Url::parse("http://x/").expect("a valid URL");
    url.path_segments_mut().expect("http URL").push(value);
    url.path()[1..].to_owned()
}

/// `GET {API_KEYS_SERVICE_URL with {cell} filled}/accounts/{account}/api-key`.
pub struct HttpApiKeys {
    http: reqwest::Client,
    url: ApiKeysUrl,
}

impl HttpApiKeys {
    pub fn new(url: ApiKeysUrl, timeout: Duration) -> Self {
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(Duration::from_secs(3))
            // A redirect would send the call elsewhere and take that host's answer as the key.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .expect("a TLS backend is compiled in");
        Self { http, url }
    }
}

#[derive(Deserialize)]
struct ApiKeyAnswer {
    api_key: String,
}

impl ApiKeySource for HttpApiKeys {
    async fn fetch(&self, wanted: &AccountCell) -> Result<ApiKey, PortError> {
        let transient = |what: String| {
            PortError::Unavailable(format!(
                "API keys service (cell {}) for account {}: {what}",
                cut(&wanted.cell),
                cut(&wanted.account)
            ))
        };
        let url = self.url.for_account(wanted).map_err(|reason| {
            PortError::Invalid(format!("no API keys request for this record: {reason}"))
        })?;
        let response = self.http.get(url).send().await.map_err(|e| {
            transient(if e.is_timeout() {
                "no answer in time".into()
            } else if e.is_connect() {
                "cannot connect".into()
            } else {
                e.without_url().to_string()
            })
        })?;
        match response.status() {
            StatusCode::OK => {
                let answer: ApiKeyAnswer = response
                    .json()
                    .await
                    .map_err(|_| transient("answer is not {\"api_key\": \"...\"}".into()))?;
                Ok(ApiKey::new(answer.api_key))
            }
            StatusCode::NOT_FOUND => Err(PortError::NotFound(format!(
                "account {} has no API key (404 from the API keys service, cell {})",
                cut(&wanted.account),
                cut(&wanted.cell)
            ))),
            status if status.is_redirection() => Err(transient(format!(
                "HTTP {}: a redirect, not followed",
                status.as_u16()
            ))),
            status => Err(transient(format!("HTTP {}", status.as_u16()))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn url(template: &str, cell: &str, account: &str) -> Result<String, String> {
        let wanted = AccountCell {
            cell: cell.into(),
            account: account.into(),
        };
        ApiKeysUrl::parse(template)?
            .for_account(&wanted)
            .map(String::from)
    }

    #[test]
    fn account_ids_are_one_percent_encoded_path_segment() {
        assert_eq!(
            url("http://keys.{cell}.local/v1/", "eu-1", "a/b c").unwrap(),
            "http://keys.eu-1.local/v1/accounts/a%2Fb%20c/api-key"
        );
    }

    #[test]
    fn a_record_never_steers_the_call_to_another_path_or_host() {
        let path = "http://keys.internal/cells/{cell}";
        assert_eq!(
            url(path, "../../admin/export?all=1#", "acct-1").unwrap(),
            "http://keys.internal/cells/..%2F..%2Fadmin%2Fexport%3Fall=1%23/accounts/acct-1/api-key"
        );
        assert_eq!(
            url(path, "eu%2F..", "a#b?c").unwrap(),
            "http://keys.internal/cells/eu%252F../accounts/a%23b%3Fc/api-key"
        );
        for (cell, account) in [
            ("..", "a"),
            (".", "a"),
            ("", "a"),
            ("eu", ".."),
            ("eu", "."),
            ("eu", ""),
            ("e\r\nu", "a"),
            ("eu", "a\nb"),
        ] {
            let error = url(path, cell, account).unwrap_err();
            assert!(
                error.contains("path segment") || error.contains("control"),
                "{error}"
            );
        }
        let host = "http://keys.{cell}.internal/v1";
        assert_eq!(
            url(host, "eu-1", "a").unwrap(),
            "http://keys.eu-1.internal/v1/accounts/a/api-key"
        );
        for cell in ["x@127.0.0.1:9/#", "a.b", "EU", "-eu", "eu/x", "e u"] {
            let error = url(host, cell, "a").unwrap_err();
            assert!(error.contains("not a DNS label"), "{cell}: {error}");
        }
    }

    #[test]
    fn the_template_places_the_cell_only_in_a_whole_label_or_segment() {
        for good in [
            "https://keys.{cell}.internal",
            "http://127.0.0.1:9/cells/{cell}/v1",
            "https://keys.internal",
        ] {
            assert!(ApiKeysUrl::parse(good).is_ok(), "{good}");
        }
        for bad in [
            "https://keys-{cell}.internal",
            "https://keys.internal/c-{cell}",
            "https://keys.internal/?cell={cell}",
            "https://{cell}@keys.internal",
            "https://keys.internal/#{cell}",
            "ftp://keys.internal",
            "not a url",
        ] {
            assert!(ApiKeysUrl::parse(bad).is_err(), "{bad}");
        }
    }
}
