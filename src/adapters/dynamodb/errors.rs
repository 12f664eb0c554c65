//! Which of DynamoDB's error answers are worth another attempt, as the SDK decides.

use serde::Deserialize;

/// Whether DynamoDB's error answer is one the SDK's retry classifier retries (its throttling
/// and transient error codes: `ProvisionedThroughputExceededException`, `ThrottlingException`,
/// `RequestLimitExceeded`, ...), or a conflict between transactions: a
/// `TransactionConflictException`, or a transaction cancelled for one. Anything else
/// (`ItemCollectionSizeLimitExceededException`, `ValidationException`, a failed condition) is
/// the caller's to read.
pub(super) fn worth_another_attempt(text: &str) -> bool {
    use aws_runtime::retries::classifiers::{THROTTLING_ERRORS, TRANSIENT_ERRORS};
    #[derive(Deserialize)]
    struct Error<'a> {
        #[serde(rename = "__type", borrow, default)]
        kind: &'a str,
        #[serde(rename = "CancellationReasons", default)]
        reasons: Vec<Reason>,
    }
    #[derive(Deserialize)]
    struct Reason {
        #[serde(rename = "Code", default)]
        code: Option<String>,
    }
    let Ok(error) = serde_json::from_str::<Error>(text) else {
        return false;
    };
    // `com.amazonaws.dynamodb.v20120810#ProvisionedThroughputExceededException`
    let code = error.kind.rsplit('#').next().unwrap_or_default();
    let conflict = |r: &Reason| r.code.as_deref() == Some("TransactionConflict");
    THROTTLING_ERRORS.contains(&code)
        || TRANSIENT_ERRORS.contains(&code)
        || code == "TransactionConflictException"
        || (code == "TransactionCanceledException" && error.reasons.iter().any(conflict))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn throttles_and_conflicts_are_tried_again_and_nothing_else() {
        let answer = |kind: &str| {
            format!(r#"{{"__type": "com.amazonaws.dynamodb.v20120810#{kind}", "message": "m"}}"#)
        };
        let again = [
            "ProvisionedThroughputExceededException",
            "ThrottlingException",
            "RequestLimitExceeded",
            "LimitExceededException",
            "TransactionInProgressException",
            "TransactionConflictException",
            "RequestTimeoutException",
        ];
        for kind in again {
            assert!(worth_another_attempt(&answer(kind)), "{kind}");
        }
        let not = [
            "ItemCollectionSizeLimitExceededException",
            "ValidationException",
            "ConditionalCheckFailedException",
            "AccessDeniedException",
            "ResourceNotFoundException",
            // Text that only looks like a throttle.
            "ValidationException: Throttling",
        ];
        for kind in not {
            assert!(!worth_another_attempt(&answer(kind)), "{kind}");
        }
        let cancelled = |code: &str| {
            format!(
                r#"{{"__type": "com.amazonaws.dynamodb.v20120810#TransactionCanceledException",
                "CancellationReasons": [{{"Code": "None"}}, {{"Code": "{code}"}}]}}"#
            )
        };
        assert!(worth_another_attempt(&cancelled("TransactionConflict")));
        assert!(!worth_another_attempt(&cancelled("ConditionalCheckFailed")));
        assert!(!worth_another_attempt("not JSON: Throttling"));
    }
}
