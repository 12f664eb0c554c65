//! The API keys service: one key per system account, fetched per (cell, account) and cached
//! briefly across warm invocations (docs/contract.md, "The API keys service").

use std::collections::{BTreeSet, HashMap};
use std::sync::Mutex;
use std::time::Duration;

use futures::StreamExt as _;
use reqwest::{StatusCode, Url};
use serde::Deserialize;
use tokio::time::Instant;

use crate::domain::ApiKey;
use crate::ports::{AccountCell, ApiKeySource, LookupCounts, PortError};

/// How many accounts are looked up at once.
const CONCURRENT_LOOKUPS: usize = 8;

/// `GET {API_KEYS_SERVICE_URL with {cell} filled}/accounts/{account}/api-key`.
pub struct HttpApiKeys {
    http: reqwest::Client,
    url_template: String,
}

impl HttpApiKeys {
    pub fn new(url_template: impl Into<String>, timeout: Duration) -> Self {
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(Duration::from_secs(3))
            .build()
            .expect("a TLS backend is compiled in");
        Self {
            http,
            url_template: url_template.into(),
        }
    }

    fn url(&self, wanted: &AccountCell) -> Result<Url, String> {
        let mut url = Url::parse(&self.url_template.replace("{cell}", &wanted.cell))
            .map_err(|e| format!("API_KEYS_SERVICE_URL for cell {}: {e}", wanted.cell))?;
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

#[derive(Deserialize)]
struct ApiKeyAnswer {
    api_key: String,
}

impl ApiKeySource for HttpApiKeys {
    async fn fetch(&self, wanted: &AccountCell) -> Result<ApiKey, PortError> {
        let transient = |what: String| {
            PortError::Transient(format!(
                "API keys service (cell {}) for account {}: {what}",
                wanted.cell, wanted.account
            ))
        };
        let url = self.url(wanted).map_err(PortError::Permanent)?;
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
                wanted.account, wanted.cell
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
                let answer = self.source.fetch(&account).await;
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
            .lookup_all(wanted(&["a", "b", "missing"]), false)
            .await;
        let (answers, second) = cache
            .lookup_all(wanted(&["a", "b", "missing"]), false)
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
        cache.lookup_all(wanted(&["a"]), false).await;
        let (_, fresh) = cache.lookup_all(wanted(&["a"]), true).await;
        assert_eq!(fresh.calls, 1);
        let (_, cached) = cache.lookup_all(wanted(&["a"]), false).await;
        assert_eq!(cached.cache_hits, 1);
        assert_eq!(cache.source.0.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn expired_keys_are_fetched_again() {
        let cache = ApiKeyCache::new(Counting(AtomicUsize::new(0)), Duration::ZERO);
        cache.lookup_all(wanted(&["a"]), false).await;
        let (_, counts) = cache.lookup_all(wanted(&["a"]), false).await;
        assert_eq!(counts.calls, 1);
    }

    #[test]
    fn account_ids_are_one_percent_encoded_path_segment() {
        let keys = HttpApiKeys::new("http://keys.{cell}.local/v1/", Duration::from_secs(1));
        let url = keys
            .url(&AccountCell {
                cell: "eu-1".into(),
                account: "a/b c".into(),
            })
            .unwrap();
        assert_eq!(
            url.as_str(),
            "http://keys.eu-1.local/v1/accounts/a%2Fb%20c/api-key"
        );
    }
}
