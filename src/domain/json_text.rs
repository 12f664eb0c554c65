//! Writing JSON text by hand where serde's general path costs most: the bulk request bodies
//! hold every value as a JSON string, and every settings value is written once per batch.

/// Appends `text` as a JSON string, exactly as serde_json writes it. A value is JSON text, with
/// a quote every few bytes: byte by byte into room for the worst case beats copying the runs
/// between them (serde_json's way). `out` should be a scratch buffer: it is first grown by
/// twice the text.
pub fn push_json_string(out: &mut Vec<u8>, text: &str) {
    let start = out.len();
    out.resize(start + text.len() * 2 + 2, 0);
    let room = &mut out[start..];
    room[0] = b'"';
    let mut end = 1;
    for &byte in text.as_bytes() {
        if byte == b'"' || byte == b'\\' {
            room[end] = b'\\';
            end += 1;
        } else if byte < 0x20 {
            // A control character is written longer (`\n`, `\u0001`): rare, left to serde_json.
            out.truncate(start);
            serde_json::to_writer(out, text).expect("strings serialize");
            return;
        }
        room[end] = byte;
        end += 1;
    }
    room[end] = b'"';
    out.truncate(start + end + 1);
}

/// Whether a string has a character JSON escapes.
pub fn needs_escape(text: &str) -> bool {
    text.bytes().any(|b| b < 0x20 || b == b'"' || b == b'\\')
}

/// Appends a short string (a name, an id, a URL) as a JSON string, exactly as serde_json
/// writes it: copied whole when nothing in it needs escaping, as is almost always the case.
pub fn push_str(out: &mut Vec<u8>, text: &str) {
    if needs_escape(text) {
        serde_json::to_writer(out, text).expect("strings serialize");
    } else {
        out.reserve(text.len() + 2);
        out.push(b'"');
        out.extend_from_slice(text.as_bytes());
        out.push(b'"');
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strings_are_escaped_as_serde_json_escapes_them() {
        let texts = [
            "",
            "plain",
            r#"{"q":"\"x\"","path":"C:\\dir"}"#,
            "\"\"\\\\",
            "line\nbreak\ttab\u{1}\u{1f}",
            "caf\u{e9} \u{1F600} \u{7f}",
        ];
        for text in texts {
            let expected = serde_json::to_string(text).unwrap();
            for push in [push_json_string, push_str] {
                let mut out = b"prefix".to_vec();
                push(&mut out, text);
                assert_eq!(
                    std::str::from_utf8(&out[6..]).unwrap(),
                    expected,
                    "{text:?}"
                );
            }
        }
    }
}
