//! Attribute values written as plain JSON: numbers verbatim (checked against DynamoDB's range),
//! sets as arrays, binary as its base64 text, map keys in order.

use std::fmt;

use base64::Engine as _;
use serde_dynamo::AttributeValue;

use crate::domain::validate::shown;
use crate::domain::InvalidRecord;

/// Cloudflare receives numbers exactly as DynamoDB holds them: at most 38 significant digits,
/// magnitudes from 1E-130 to under 1E+126.
const MAX_DIGITS: usize = 38;
const EXPONENTS: std::ops::RangeInclusive<i64> = -130..=125;

/// Where a value is in an item, for errors: built on the stack, rendered only when one occurs.
#[derive(Clone, Copy)]
pub enum Path<'p> {
    Attribute(&'p str),
    Key(&'p Path<'p>, &'p str),
    Index(&'p Path<'p>, usize),
}

impl fmt::Display for Path<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Path::Attribute(name) => f.write_str(name),
            Path::Key(parent, name) => write!(f, "{parent}.{name}"),
            Path::Index(parent, i) => write!(f, "{parent}[{i}]"),
        }
    }
}

/// Checks a DynamoDB number's text: JSON's number grammar, within DynamoDB's range.
fn check_number(n: &str) -> Result<(), String> {
    let invalid = || format!("{} is not a number", shown(n));
    let unsigned = n.strip_prefix('-').unwrap_or(n);
    let (mantissa, exponent) = match unsigned.find(['e', 'E']) {
        Some(at) => (&unsigned[..at], Some(&unsigned[at + 1..])),
        None => (unsigned, None),
    };
    let (int, frac) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !digits(int) || (int.len() > 1 && int.starts_with('0')) {
        return Err(invalid());
    }
    if mantissa.contains('.') && !digits(frac) {
        return Err(invalid());
    }
    let exponent: i64 = match exponent {
        None => 0,
        Some(e) if digits(e.strip_prefix(['+', '-']).unwrap_or(e)) => {
            e.parse().map_err(|_| invalid())?
        }
        Some(_) => return Err(invalid()),
    };
    let digit_at = |i: usize| {
        if i < int.len() {
            int.as_bytes()[i]
        } else {
            frac.as_bytes()[i - int.len()]
        }
    };
    let count = int.len() + frac.len();
    let Some(first) = (0..count).find(|&i| digit_at(i) != b'0') else {
        return Ok(()); // zero
    };
    let last = (0..count).rfind(|&i| digit_at(i) != b'0').unwrap_or(first);
    // Saturating: an exponent near i64's bounds is out of range, never an overflow.
    let leading_power = exponent
        .saturating_add(int.len() as i64)
        .saturating_sub(first as i64 + 1);
    if last - first + 1 > MAX_DIGITS || !EXPONENTS.contains(&leading_power) {
        return Err(format!(
            "number {} is outside DynamoDB's range (38 digits, 1E-130 to 9.99E+125)",
            shown(n)
        ));
    }
    Ok(())
}

fn string(s: &str, out: &mut Vec<u8>) {
    serde_json::to_writer(out, s).expect("a string serializes");
}

fn number(n: &str, path: Path, out: &mut Vec<u8>) -> Result<(), InvalidRecord> {
    check_number(n).map_err(|message| InvalidRecord::BadAttribute {
        path: path.to_string(),
        message,
    })?;
    out.extend_from_slice(n.as_bytes());
    Ok(())
}

fn list<T>(
    items: &[T],
    out: &mut Vec<u8>,
    mut write: impl FnMut(usize, &T, &mut Vec<u8>) -> Result<(), InvalidRecord>,
) -> Result<(), InvalidRecord> {
    out.push(b'[');
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        write(i, item, out)?;
    }
    out.push(b']');
    Ok(())
}

/// Binary is written as its base64 text, as DynamoDB's JSON gives it.
fn binary(bytes: &[u8], out: &mut Vec<u8>) {
    string(
        &base64::engine::general_purpose::STANDARD.encode(bytes),
        out,
    );
}

/// Writes an attribute value as JSON into `out`.
pub fn write_json(
    value: &AttributeValue,
    path: Path,
    out: &mut Vec<u8>,
) -> Result<(), InvalidRecord> {
    match value {
        AttributeValue::N(n) => number(n, path, out)?,
        AttributeValue::S(s) => string(s, out),
        AttributeValue::B(b) => binary(b, out),
        AttributeValue::Bool(b) => out.extend_from_slice(if *b { b"true" } else { b"false" }),
        AttributeValue::Null(_) => out.extend_from_slice(b"null"),
        AttributeValue::M(map) => {
            let mut names: Vec<&String> = map.keys().collect();
            names.sort_unstable();
            out.push(b'{');
            for (i, name) in names.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                string(name, out);
                out.push(b':');
                write_json(&map[name], Path::Key(&path, name), out)?;
            }
            out.push(b'}');
        }
        AttributeValue::L(items) => list(items, out, |i, item, out| {
            write_json(item, Path::Index(&path, i), out)
        })?,
        AttributeValue::Ss(set) => list(set, out, |_, s, out| {
            string(s, out);
            Ok(())
        })?,
        AttributeValue::Bs(set) => list(set, out, |_, b, out| {
            binary(b, out);
            Ok(())
        })?,
        AttributeValue::Ns(set) => {
            list(set, out, |i, n, out| number(n, Path::Index(&path, i), out))?
        }
    }
    Ok(())
}

/// An attribute as JSON text.
pub fn to_json(value: &AttributeValue, name: &str) -> Result<String, InvalidRecord> {
    let mut out = Vec::with_capacity(256);
    write_json(value, Path::Attribute(name), &mut out)?;
    Ok(String::from_utf8(out).expect("JSON written from strings is UTF-8"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_follow_json_grammar_and_dynamodb_range() {
        for ok in ["0", "-0", "0.0", "1.5E-130", "9.99E+125", "120", "0.000100"] {
            assert_eq!(check_number(ok), Ok(()), "{ok}");
        }
        for bad in [
            "", "-", "01", "1.", ".5", "1e", "NaN", "1E+126", "1e-131", "+1",
        ] {
            assert!(check_number(bad).is_err(), "{bad}");
        }
        assert!(check_number(&"9".repeat(38)).is_ok());
        assert!(check_number(&"9".repeat(39)).is_err());
    }

    #[test]
    fn exponents_at_the_bounds_of_i64_are_out_of_range_not_an_overflow() {
        for extreme in [
            "1e9223372036854775807",
            "10e9223372036854775807",
            "0.01e-9223372036854775808",
            "1e-9223372036854775808",
            "1e99999999999999999999",
        ] {
            let error = check_number(extreme).unwrap_err();
            assert!(
                error.contains("outside") || error.contains("not a number"),
                "{error}"
            );
        }
        let long = format!("1e{}", "9".repeat(1_000_000));
        assert!(
            check_number(&long).unwrap_err().len() < 400,
            "the number is cut"
        );
    }

    #[test]
    fn paths_name_nested_values() {
        let root = Path::Attribute("search_config");
        let key = Path::Key(&root, "targets");
        assert_eq!(Path::Index(&key, 2).to_string(), "search_config.targets[2]");
    }
}
