//! The Cloudflare API token, kept in Secrets Manager as a bare string.

use std::fmt;
use std::future::Future;

/// The Cloudflare API token. Only [`ApiToken::expose`] gives it out: never `Debug` or `Display`.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiToken(String);

impl ApiToken {
    pub fn new(token: impl Into<String>) -> Self {
        Self(token.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for ApiToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ApiToken(<redacted>)")
    }
}

/// Where the token comes from; fetched at first use and again after a 401/403.
pub trait TokenSource: Send + Sync {
    fn fetch_token(&self) -> impl Future<Output = Result<ApiToken, String>> + Send;
}

pub struct SecretsManagerToken {
    client: aws_sdk_secretsmanager::Client,
    secret_id: String,
}

impl SecretsManagerToken {
    pub fn new(client: aws_sdk_secretsmanager::Client, secret_id: impl Into<String>) -> Self {
        Self {
            client,
            secret_id: secret_id.into(),
        }
    }
}

impl TokenSource for SecretsManagerToken {
    async fn fetch_token(&self) -> Result<ApiToken, String> {
        let secret = self
            .client
            .get_secret_value()
            .secret_id(&self.secret_id)
            .send()
            .await
            .map_err(|e| {
                format!(
                    "secret {}: {}",
                    self.secret_id,
                    aws_sdk_secretsmanager::error::DisplayErrorContext(e)
                )
            })?;
        secret
            .secret_string()
            .map(str::trim)
            .filter(|token| !token.is_empty())
            .map(ApiToken::new)
            .ok_or_else(|| format!("secret {} has no SecretString", self.secret_id))
    }
}
