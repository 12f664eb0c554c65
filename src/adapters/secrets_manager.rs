//! The Cloudflare API token, kept in Secrets Manager as a bare string.

use super::cloudflare::TokenSource;
use crate::domain::ApiToken;
use crate::ports::PortError;

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
    async fn fetch_token(&self) -> Result<ApiToken, PortError> {
        let secret = self
            .client
            .get_secret_value()
            .secret_id(&self.secret_id)
            .send()
            .await
            .map_err(|e| {
                // The SDK has already retried what it could.
                PortError::Unavailable(format!(
                    "secret {}: {}",
                    self.secret_id,
                    aws_sdk_secretsmanager::error::DisplayErrorContext(e)
                ))
            })?;
        secret
            .secret_string()
            .map(str::trim)
            .filter(|token| !token.is_empty())
            .map(ApiToken::new)
            .ok_or_else(|| {
                PortError::NotFound(format!("secret {} has no SecretString", self.secret_id))
            })
    }
}
