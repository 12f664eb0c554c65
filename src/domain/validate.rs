//! What a record's fields must be before they become a KV key, a URL or part of a message:
//! table items are input, not trusted code (docs/contract.md, "Validation").

use std::borrow::Cow;

/// A shop key is a shop's permanent Shopify domain, `{handle}.myshopify.com`: a form no index
/// key may take, so a shop id can never name another tenant's index key.
pub const SHOP_DOMAIN: &str = ".myshopify.com";

/// How much of any one input value a message or log line shows.
pub const SHOWN_BYTES: usize = 200;

/// Whether a key name has the form of a shop key (every index key must not).
fn is_shop_domain(key: &str) -> bool {
    key.strip_suffix(SHOP_DOMAIN).is_some_and(is_dns_label)
}

/// Why a shop id cannot be a shop key, if it cannot.
pub fn shop_id_problem(shop: &str) -> Option<String> {
    (!is_shop_domain(shop)).then(|| {
        format!(
            "shop id {} is not a Shopify shop domain (`{{handle}}{SHOP_DOMAIN}`, the handle of \
             lower-case letters, digits and hyphens): it could name another index's key",
            shown(shop)
        )
    })
}

/// Why an index's own key `{account}-{index}` cannot be written, if it cannot: it has the
/// form of a shop key, which belongs to whichever index names that shop.
pub fn index_key_problem(index_key: &str) -> Option<String> {
    is_shop_domain(index_key).then(|| {
        format!(
            "index key {} has the form of a shop key (`…{SHOP_DOMAIN}`): it could take a shop's key",
            shown(index_key)
        )
    })
}

/// A DNS label: 1 to 63 lower-case letters, digits and hyphens, no hyphen at either end.
pub fn is_dns_label(label: &str) -> bool {
    let bytes = label.as_bytes();
    (1..=63).contains(&bytes.len())
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
        && bytes[0] != b'-'
        && bytes[bytes.len() - 1] != b'-'
}

/// Why a value cannot be one path segment of a URL, if it cannot: empty, `.` or `..` (which
/// collapse into another path) or a control character (which URL parsers drop silently).
pub fn path_segment_problem(value: &str) -> Option<String> {
    if value.is_empty() || value == "." || value == ".." {
        return Some(format!("{} cannot be a URL path segment", shown(value)));
    }
    value
        .chars()
        .any(char::is_control)
        .then(|| format!("{} holds a control character", shown(value)))
}

/// Why an index endpoint is not an `https` URL with a host and without credentials, if it is
/// not: what the `url` crate makes of it. (A hand check of the common form saved 0.3 µs a
/// record, within the noise of a batch as deployed: docs/performance.md.)
pub fn endpoint_problem(endpoint: &str) -> Option<String> {
    let problem = match url::Url::parse(endpoint) {
        Err(e) => e.to_string(),
        Ok(url) if url.scheme() != "https" => format!("scheme `{}`, not https", url.scheme()),
        Ok(url) if url.host_str().is_none_or(str::is_empty) => "no host".into(),
        Ok(url) if !url.username().is_empty() || url.password().is_some() => {
            "credentials in the URL".into()
        }
        Ok(_) => return None,
    };
    Some(format!(
        "{} is not an https URL: {problem}",
        shown(endpoint)
    ))
}

/// A value as messages show it: quoted and [`cut`].
pub fn shown(value: &str) -> String {
    format!("`{}`", cut(value))
}

/// A value cut to its first [`SHOWN_BYTES`] and last few bytes (on character boundaries), with
/// its full size between, so a multi-megabyte field never fills a log line and the end of a
/// message about it ("expected a boolean") is kept.
pub fn cut(value: &str) -> Cow<'_, str> {
    const TAIL_BYTES: usize = 60;
    if value.len() <= SHOWN_BYTES + TAIL_BYTES {
        return Cow::Borrowed(value);
    }
    let mut head = SHOWN_BYTES;
    while !value.is_char_boundary(head) {
        head -= 1;
    }
    let mut tail = value.len() - TAIL_BYTES;
    while !value.is_char_boundary(tail) {
        tail += 1;
    }
    Cow::Owned(format!(
        "{}… ({} bytes) …{}",
        &value[..head],
        value.len(),
        &value[tail..]
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_shop_id_is_a_shopify_domain_and_no_index_key_is_one() {
        assert!(shop_id_problem("shop-1.myshopify.com").is_none());
        for bad in [
            "acct-2-products",
            "shop-1",
            "Shop-1.myshopify.com",
            "-x.myshopify.com",
            ".myshopify.com",
            "a.b.myshopify.com",
            "x.myshopify.com ",
        ] {
            assert!(shop_id_problem(bad).is_some(), "{bad}");
        }
        assert!(index_key_problem("acct-1-products").is_none());
        // (acct, 1-x.myshopify.com) would overwrite the shop key `acct-1-x.myshopify.com`.
        assert!(index_key_problem("acct-1-x.myshopify.com").is_some());
    }

    #[test]
    fn path_segments_refuse_what_collapses_or_vanishes() {
        for bad in ["", ".", "..", "a\r\nb", "a\tb", "\u{7f}"] {
            assert!(path_segment_problem(bad).is_some(), "{bad:?}");
        }
        assert!(
            path_segment_problem("a/b c?d#").is_none(),
            "encoded, not refused"
        );
    }

    #[test]
    fn endpoints_are_https_urls_with_a_host() {
        for good in [
            "https://idx.example/products",
            "https://acct-1-products.idx.example/v1/indexes?x=1#f",
            "https://127.0.0.1:8443/p",
            "https://[::1]/x",
        ] {
            assert!(endpoint_problem(good).is_none(), "{good}");
        }
        for bad in [
            "http://idx.example",
            "u",
            "javascript:alert(1)",
            "https://user:pw@idx.example",
            "https://user@idx.example",
            "https://",
            "https://h:65536",
            "ftp://x",
        ] {
            assert!(endpoint_problem(bad).is_some(), "{bad}");
        }
    }

    #[test]
    fn long_values_are_cut_on_a_character_boundary() {
        let long = format!("{}!", "é".repeat(1_000_000));
        let shown = shown(&long);
        assert!(shown.len() < SHOWN_BYTES + 100, "{}", shown.len());
        assert!(
            shown.contains("(2000001 bytes)") && shown.ends_with("éé!`"),
            "{shown}"
        );
        assert_eq!(cut("short"), "short");
    }
}
