//! Configuration from the environment (docs/contract.md, "Configuration").

use std::time::Duration;

use crate::adapters::api_keys::{ApiKeysUrl, CELL};

/// Why the function cannot start. Named after the variable, never its value.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ConfigError {
    #[error("missing required environment variable {0}")]
    Missing(&'static str),
    #[error("environment variable {name} is invalid: {reason}")]
    Invalid { name: &'static str, reason: String },
}

#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub settings_table_name: String,
    pub default_configs_sk: String,
    pub cloudflare_account_id: String,
    pub settings_namespace_id: String,
    pub query_config_namespace_id: String,
    pub api_token_secret_id: String,
    pub cloudflare_api_base_url: reqwest::Url,
    /// May hold `{cell}` (a host label or a path segment), filled per record.
    pub api_keys_service_url: ApiKeysUrl,
    /// The settings table's stream: records from any other source are rejected.
    pub settings_table_stream_arn: String,
    pub default_cell: String,
    /// How long a fetched API key is reused by warm invocations.
    pub api_key_cache_ttl: Duration,
    /// How long one call to the API keys service may take.
    pub api_keys_timeout: Duration,
    /// Retrying stops this long before the invocation deadline, so the batch response is sent.
    pub deadline_margin: Duration,
    /// Cloudflare API requests per 5 minutes, per warm container (Cloudflare allows 1,200).
    pub cloudflare_requests_per_5_minutes: u32,
    /// The function's own table (the export ledger: references, a scheduled reconcile's pass).
    pub ledger_table_name: String,
    /// How often a scheduled reconcile starts a new full pass.
    pub reconcile_every: Duration,
}

impl Config {
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    pub fn from_lookup(var: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let required = |name: &'static str| {
            var(name)
                .filter(|v| !v.trim().is_empty())
                .ok_or(ConfigError::Missing(name))
        };
        let optional = |name: &'static str, default: &str| {
            var(name)
                .filter(|v| !v.trim().is_empty())
                .unwrap_or_else(|| default.to_owned())
        };
        let seconds = |name: &'static str, default: &str| {
            optional(name, default)
                .parse::<f64>()
                .ok()
                .filter(|s| s.is_finite() && *s >= 0.0)
                .map(Duration::from_secs_f64)
                .ok_or(ConfigError::Invalid {
                    name,
                    reason: "expected a number of seconds".into(),
                })
        };
        let url = |name: &'static str, value: String| {
            reqwest::Url::parse(&value).map_err(|e| ConfigError::Invalid {
                name,
                reason: e.to_string(),
            })?;
            Ok(value)
        };
        let plain_http_hosts = optional("PLAIN_HTTP_HOSTS", "");
        let api_keys_url = |name: &'static str| {
            let template = required(name)?;
            refuse_plain_http(name, &template, &plain_http_hosts)?;
            ApiKeysUrl::parse(&template).map_err(|reason| ConfigError::Invalid { name, reason })
        };

        let base = url(
            "CLOUDFLARE_API_BASE_URL",
            optional(
                "CLOUDFLARE_API_BASE_URL",
                "https://api.cloudflare.com/client/v4",
            ),
        )?;
        refuse_plain_http("CLOUDFLARE_API_BASE_URL", &base, &plain_http_hosts)?;
        Ok(Self {
            settings_table_name: required("SETTINGS_TABLE_NAME")?,
            default_configs_sk: optional("DEFAULT_CONFIGS_SK", "DEFAULT_CONFIGS"),
            cloudflare_account_id: required("CLOUDFLARE_ACCOUNT_ID")?,
            settings_namespace_id: required("CLOUDFLARE_KV_NAMESPACE_ID")?,
            query_config_namespace_id: required("CLOUDFLARE_QCFG_NAMESPACE_ID")?,
            api_token_secret_id: required("CLOUDFLARE_API_TOKEN_SECRET_ID")?,
            cloudflare_api_base_url: reqwest::Url::parse(&base).expect("validated above"),
            api_keys_service_url: api_keys_url("API_KEYS_SERVICE_URL")?,
            settings_table_stream_arn: required("SETTINGS_TABLE_STREAM_ARN")?,
            default_cell: optional("DEFAULT_CELL", "default"),
            api_key_cache_ttl: seconds("API_KEY_CACHE_TTL_SECONDS", "60")?,
            api_keys_timeout: seconds("API_KEYS_TIMEOUT_SECONDS", "5")?,
            deadline_margin: seconds("DEADLINE_MARGIN_SECONDS", "5")?,
            cloudflare_requests_per_5_minutes: optional("CLOUDFLARE_REQUESTS_PER_5_MINUTES", "600")
                .parse::<u32>()
                .ok()
                .filter(|n| (1..=1200).contains(n))
                .ok_or(ConfigError::Invalid {
                    name: "CLOUDFLARE_REQUESTS_PER_5_MINUTES",
                    reason: "expected a whole number from 1 to 1200".into(),
                })?,
            ledger_table_name: required("LEDGER_TABLE_NAME")?,
            reconcile_every: optional("RECONCILE_EVERY_HOURS", "6")
                .parse::<u64>()
                .ok()
                .filter(|h| (1..=168).contains(h))
                .map(|h| Duration::from_secs(h * 3600))
                .ok_or(ConfigError::Invalid {
                    name: "RECONCILE_EVERY_HOURS",
                    reason: "expected a whole number of hours from 1 to 168".into(),
                })?,
        })
    }
}

/// A URL that carries a secret (the Cloudflare token, each account's API key) is `https`, or
/// plain `http` to this machine (`localhost`, a loopback address: the local stack, the tests) or
/// to a host the operator names in `PLAIN_HTTP_HOSTS` (comma-separated, as the URL writes it
/// without its port, `{cell}` included).
fn refuse_plain_http(name: &'static str, url: &str, allowed: &str) -> Result<(), ConfigError> {
    let parsed = reqwest::Url::parse(&url.replace("{cell}", CELL)).ok();
    let Some(parsed) = parsed.filter(|u| u.scheme() == "http") else {
        return Ok(());
    };
    let loopback = match parsed.host() {
        Some(url::Host::Domain(domain)) => domain == "localhost",
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        None => false,
    };
    // The host as the URL writes it (a `{cell}` label kept), to match PLAIN_HTTP_HOSTS.
    let host = parsed
        .host_str()
        .unwrap_or_default()
        .replace(CELL, "{cell}");
    let named = (allowed.split(',')).any(|h| h.trim().eq_ignore_ascii_case(&host));
    match loopback || named {
        true => Ok(()),
        false => Err(ConfigError::Invalid {
            name,
            reason: format!(
                "plain http to `{host}` would send secrets unencrypted: use https, or name the \
                 host in PLAIN_HTTP_HOSTS to allow it"
            ),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env() -> HashMap<&'static str, &'static str> {
        HashMap::from([
            ("SETTINGS_TABLE_NAME", "dev-EcomIndexSettingsTable"),
            ("CLOUDFLARE_ACCOUNT_ID", "cf-acct"),
            ("CLOUDFLARE_KV_NAMESPACE_ID", "ns-settings"),
            ("CLOUDFLARE_QCFG_NAMESPACE_ID", "ns-qcfg"),
            ("CLOUDFLARE_API_TOKEN_SECRET_ID", "dev/CloudFlareApiToken"),
            ("API_KEYS_SERVICE_URL", "https://keys.{cell}.example"),
            ("LEDGER_TABLE_NAME", "dev-EcomSettingsExporterLedger"),
            (
                "SETTINGS_TABLE_STREAM_ARN",
                "arn:aws:dynamodb:eu-west-1:1:table/t/stream/2026-01-01T00:00:00.000",
            ),
        ])
    }

    fn load(env: &HashMap<&'static str, &'static str>) -> Result<Config, ConfigError> {
        Config::from_lookup(|name| env.get(name).map(|v| v.to_string()))
    }

    #[test]
    fn defaults_fill_the_optional_settings() {
        let config = load(&env()).unwrap();
        assert_eq!(config.default_configs_sk, "DEFAULT_CONFIGS");
        assert_eq!(config.default_cell, "default");
        assert_eq!(
            config.cloudflare_api_base_url.as_str(),
            "https://api.cloudflare.com/client/v4"
        );
    }

    #[test]
    fn a_missing_variable_is_named() {
        for name in [
            "SETTINGS_TABLE_NAME",
            "CLOUDFLARE_ACCOUNT_ID",
            "CLOUDFLARE_KV_NAMESPACE_ID",
            "CLOUDFLARE_QCFG_NAMESPACE_ID",
            "CLOUDFLARE_API_TOKEN_SECRET_ID",
            "API_KEYS_SERVICE_URL",
            "SETTINGS_TABLE_STREAM_ARN",
            "LEDGER_TABLE_NAME",
        ] {
            let mut env = env();
            env.remove(name);
            assert_eq!(
                load(&env).unwrap_err().to_string(),
                format!("missing required environment variable {name}")
            );
        }
    }

    #[test]
    fn a_bad_url_is_named() {
        let mut env = env();
        env.insert("CLOUDFLARE_API_BASE_URL", "not a url");
        assert!(load(&env)
            .unwrap_err()
            .to_string()
            .starts_with("environment variable CLOUDFLARE_API_BASE_URL is invalid"));
    }

    #[test]
    fn plain_http_is_refused_but_to_this_machine_or_a_host_named_to_allow_it() {
        let refused = |name: &'static str, value: &'static str, allowed: &'static str| {
            let mut env = env();
            env.insert(name, value);
            env.insert("PLAIN_HTTP_HOSTS", allowed);
            load(&env).err().map(|e| e.to_string())
        };
        for (name, value) in [
            ("API_KEYS_SERVICE_URL", "http://keys.internal/cells/{cell}"),
            ("API_KEYS_SERVICE_URL", "http://{cell}.keys.internal"),
            (
                "API_KEYS_SERVICE_URL",
                "HTTP://user@keys.internal:8080/{cell}",
            ),
            (
                "CLOUDFLARE_API_BASE_URL",
                "http://cf-proxy.internal/client/v4",
            ),
            (
                "CLOUDFLARE_API_BASE_URL",
                "http://127.0.0.1.example/client/v4",
            ),
        ] {
            let error = refused(name, value, "").unwrap_or_default();
            assert!(
                error.starts_with(&format!(
                    "environment variable {name} is invalid: plain http"
                )),
                "{value}: {error}"
            );
        }
        assert_eq!(
            refused(
                "API_KEYS_SERVICE_URL",
                "http://{cell}.keys.internal",
                " {cell}.keys.internal"
            ),
            None
        );
        assert_eq!(
            refused(
                "CLOUDFLARE_API_BASE_URL",
                "http://cf-proxy.internal/v4",
                "a,cf-proxy.internal"
            ),
            None
        );
        for local in [
            "http://127.0.0.1:8788/cells/{cell}",
            "http://localhost/x",
            "http://[::1]:9/",
        ] {
            assert_eq!(refused("API_KEYS_SERVICE_URL", local, ""), None, "{local}");
        }
        assert_eq!(
            refused("API_KEYS_SERVICE_URL", "https://keys.internal", ""),
            None
        );
    }

    #[test]
    fn a_cell_placed_anywhere_but_a_host_label_or_path_segment_is_refused() {
        let mut env = env();
        env.insert("API_KEYS_SERVICE_URL", "https://keys.example/?cell={cell}");
        assert!(load(&env)
            .unwrap_err()
            .to_string()
            .starts_with("environment variable API_KEYS_SERVICE_URL is invalid"));
    }
}
