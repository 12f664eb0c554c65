//! The API keys service: one key per system account, fetched per (cell, account) and cached
//! briefly across warm invocations (docs/contract.md, "The API keys service").

use std::collections::{BTreeSet, HashMap};
use std::sync::Mutex;
use std::time::Duration;

use futures::StreamExt as _;
use reqwest::{StatusCode, Url};
use serde::Deserialize;
use tokio::time::Instant;

use crate::domain::validate::{cut, is_dns_label, path_segment_problem, shown};
use crate::domain::ApiKey;
use crate::ports::{before_deadline, AccountCell, ApiKeySource, LookupCounts, PortError};

/// How many accounts are looked up at once.
const CONCURRENT_LOOKUPS: usize = 8;

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
const CELL: &str = "cell0placeholder0";

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
            PortError::Transient(format!(
                "API keys service (cell {}) for account {}: {what}",
                cut(&wanted.cell),
                cut(&wanted.account)
            ))
        };
        let url = self.url.for_account(wanted).map_err(|reason| {
            PortError::Permanent(format!("no API keys request for this record: {reason}"))
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
            StatusCode::NOT_FOUND => Err(PortError::Permanent(format!(
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

/// Keys fetched by earlier warm invocations are reused for a short while; failures are not kept.
pub struct ApiKeyCache<S> {
    source: S,
    ttl: Duration,
    entries: Mutex<HashMap<AccountCell, (ApiKey, Instant)>>,
}

impl<S: ApiKeySource> ApiKeyCache<S> {
    pub fn new(source: S, ttl: Duration) -> Self {
        Self {
            source,
            ttl,
            entries: Mutex::new(HashMap::new()),
        }
    }

    fn cached(&self, wanted: &AccountCell) -> Option<ApiKey> {
        let entries = self.entries.lock().expect("not poisoned");
        entries
            .get(wanted)
            .filter(|(_, fetched)| fetched.elapsed() < self.ttl)
            .map(|(key, _)| key.clone())
    }

    /// One call per (cell, account) not in the cache (every one when `fresh`: operators must
    /// never write a key that was rotated out), a few at a time.
    pub async fn lookup_all(
        &self,
        wanted: BTreeSet<AccountCell>,
        fresh: bool,
        deadline: Instant,
    ) -> (
        HashMap<AccountCell, Result<ApiKey, PortError>>,
        LookupCounts,
    ) {
        let mut answers = HashMap::new();
        let mut counts = LookupCounts::default();
        let mut missing = Vec::new();
        for account in wanted {
            match self.cached(&account).filter(|_| !fresh) {
                Some(key) => {
                    counts.cache_hits += 1;
                    answers.insert(account, Ok(key));
                }
                None => missing.push(account),
            }
        }
        counts.calls = missing.len();
        let fetched: Vec<_> = futures::stream::iter(missing)
            .map(|account| async move {
                // Whatever is not answered by the deadline is reported for retry, not waited for.
                let what = format!("API keys service (cell {})", cut(&account.cell));
                let answer = before_deadline(deadline, &what, self.source.fetch(&account)).await;
                (account, answer)
            })
            .buffer_unordered(CONCURRENT_LOOKUPS)
            .collect()
            .await;
        let mut entries = self.entries.lock().expect("not poisoned");
        for (account, answer) in fetched {
            if let Ok(key) = &answer {
                entries.insert(account.clone(), (key.clone(), Instant::now()));
            }
            answers.insert(account, answer);
        }
        (answers, counts)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    struct Counting(AtomicUsize);

    impl ApiKeySource for Counting {
        async fn fetch(&self, wanted: &AccountCell) -> Result<ApiKey, PortError> {
            self.0.fetch_add(1, Ordering::SeqCst);
            if wanted.account == "missing" {
                Err(PortError::Permanent("none".into()))
            } else {
                Ok(ApiKey::new(format!("key-{}", wanted.account)))
            }
        }
    }

    fn wanted(accounts: &[&str]) -> BTreeSet<AccountCell> {
        accounts
            .iter()
            .map(|a| AccountCell {
                cell: "default".into(),
                account: a.to_string(),
            })
            .collect()
    }

    #[tokio::test]
    async fn warm_invocations_reuse_keys_but_not_failures() {
        let cache = ApiKeyCache::new(Counting(AtomicUsize::new(0)), Duration::from_secs(60));
        let (_, first) = cache
            .lookup_all(wanted(&["a", "b", "missing"]), false, later())
            .await;
        let (answers, second) = cache
            .lookup_all(wanted(&["a", "b", "missing"]), false, later())
            .await;
        assert_eq!(
            first,
            LookupCounts {
                calls: 3,
                cache_hits: 0
            }
        );
        assert_eq!(
            second,
            LookupCounts {
                calls: 1,
                cache_hits: 2
            }
        );
        assert_eq!(cache.source.0.load(Ordering::SeqCst), 4);
        assert_eq!(answers.len(), 3);
    }

    #[tokio::test]
    async fn fresh_lookups_skip_the_cache_and_refill_it() {
        let cache = ApiKeyCache::new(Counting(AtomicUsize::new(0)), Duration::from_secs(60));
        cache.lookup_all(wanted(&["a"]), false, later()).await;
        let (_, fresh) = cache.lookup_all(wanted(&["a"]), true, later()).await;
        assert_eq!(fresh.calls, 1);
        let (_, cached) = cache.lookup_all(wanted(&["a"]), false, later()).await;
        assert_eq!(cached.cache_hits, 1);
        assert_eq!(cache.source.0.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn expired_keys_are_fetched_again() {
        let cache = ApiKeyCache::new(Counting(AtomicUsize::new(0)), Duration::ZERO);
        cache.lookup_all(wanted(&["a"]), false, later()).await;
        let (_, counts) = cache.lookup_all(wanted(&["a"]), false, later()).await;
        assert_eq!(counts.calls, 1);
    }

    fn later() -> Instant {
        Instant::now() + Duration::from_secs(60)
    }

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

    struct Slow;

    impl ApiKeySource for Slow {
        async fn fetch(&self, wanted: &AccountCell) -> Result<ApiKey, PortError> {
            tokio::time::sleep(Duration::from_secs(1)).await;
            Ok(ApiKey::new(format!("key-{}", wanted.account)))
        }
    }

    #[tokio::test(start_paused = true)]
    async fn lookups_stop_at_the_deadline_and_report_the_rest_for_retry() {
        let cache = ApiKeyCache::new(Slow, Duration::from_secs(60));
        let accounts: Vec<String> = (0..40).map(|i| format!("a{i}")).collect();
        let accounts: Vec<&str> = accounts.iter().map(String::as_str).collect();
        let started = Instant::now();
        let deadline = started + Duration::from_millis(2_500);
        let (answers, _) = cache.lookup_all(wanted(&accounts), true, deadline).await;
        assert!(
            started.elapsed() <= Duration::from_millis(2_600),
            "{:?}",
            started.elapsed()
        );
        let late = answers
            .values()
            .filter(|a| matches!(a, Err(PortError::Transient(r)) if r.contains("deadline")))
            .count();
        // Eight at a time, a second each: two rounds answered before the deadline.
        assert_eq!((answers.len(), late), (40, 24));
    }
}
