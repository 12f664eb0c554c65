//! What the fields of an operator's payload may hold, each refused by name with what is wrong:
//! non-empty strings, flags, whole numbers in a range, continuation tokens (opaque to the
//! operator).

use serde::{Deserialize, Deserializer, Serialize};
use serde_json::Value;

use super::OperatorError;

/// A request struct from the payload's fields, with serde's words turned into the field's name
/// and what is wrong with it. serde gives a missing or unknown field only in its message: the
/// message is read here, and `operator::tests` (`manual_payloads_are_checked_field_by_field`,
/// `operator_modes_are_parsed_and_typos_are_named`) fail if serde ever words it otherwise.
pub(super) fn typed<R: for<'de> Deserialize<'de>>(fields: Value) -> Result<R, OperatorError> {
    serde_path_to_error::deserialize(fields).map_err(|e| {
        let message = e.inner().to_string();
        let quoted = |prefix: &str| {
            message
                .strip_prefix(prefix)
                .and_then(|rest| rest.split('`').next())
                .map(str::to_owned)
        };
        if let Some(field) = quoted("missing field `") {
            return OperatorError::invalid(field, "is required");
        }
        if let Some(field) = quoted("unknown field `") {
            let allowed = message
                .split_once("expected one of ")
                .map(|(_, names)| names.replace('`', ""))
                .unwrap_or_default();
            let problem = format!("is not a field of this mode (fields: mode, {allowed})");
            return OperatorError::invalid(field, problem);
        }
        OperatorError::invalid(e.path().to_string(), message)
    })
}

/// Where a long run goes on, handed to the operator as an opaque string.
pub(super) fn encode_token(position: &impl Serialize) -> String {
    use base64::Engine as _;
    let json = serde_json::to_vec(position).expect("positions serialize");
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(json)
}

pub(super) fn decode_token<T: for<'de> Deserialize<'de>>(token: &str) -> Result<T, OperatorError> {
    use base64::Engine as _;
    let invalid = || {
        OperatorError::invalid(
            "continuation_token",
            "is not a token this function gave out",
        )
    };
    let json = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(token)
        .map_err(|_| invalid())?;
    serde_json::from_slice(&json).map_err(|_| invalid())
}

/// A non-empty string field (a name or a token as the operator typed it).
#[derive(Debug, Clone, PartialEq)]
pub struct NonEmpty(pub String);

impl<'de> Deserialize<'de> for NonEmpty {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        match Value::deserialize(deserializer)? {
            Value::String(s) if s.is_empty() => Err(serde::de::Error::custom("is empty")),
            Value::String(s) => Ok(NonEmpty(s)),
            _ => Err(serde::de::Error::custom("must be a string")),
        }
    }
}

/// A true/false field; absent or null is false.
pub(super) fn flag<'de, D: Deserializer<'de>>(deserializer: D) -> Result<bool, D::Error> {
    match Value::deserialize(deserializer)? {
        Value::Bool(b) => Ok(b),
        Value::Null => Ok(false),
        _ => Err(serde::de::Error::custom("must be true or false")),
    }
}

/// A whole number in `range`; absent or null is `None`.
pub(super) fn count<'de, D: Deserializer<'de>>(
    deserializer: D,
    range: std::ops::RangeInclusive<u64>,
) -> Result<Option<u64>, D::Error> {
    match Value::deserialize(deserializer)? {
        Value::Null => Ok(None),
        value => value
            .as_u64()
            .filter(|n| range.contains(n))
            .map(Some)
            .ok_or_else(|| {
                serde::de::Error::custom(format!(
                    "must be a whole number from {} to {}",
                    range.start(),
                    range.end()
                ))
            }),
    }
}

/// A count of records to stop after, with a token.
pub(super) fn max_records<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<usize>, D::Error> {
    Ok(count(deserializer, 1..=u32::MAX as u64)?.map(|n| n as usize))
}
