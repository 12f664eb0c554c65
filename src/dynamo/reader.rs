//! A hand-written reader of DynamoDB's attribute-value JSON, for the one payload that is large:
//! a stream batch. It builds what serde builds from the same text ([`Image`], [`Attr`],
//! [`OldImage`]) without serde's per-token calls. It decides nothing about bad input: on
//! anything it does not expect it gives up (`None`), and the caller reads the payload again
//! through serde, which accepts or refuses it and says why. Escaped strings and numbers are
//! handed to serde_json itself, so they read exactly as there.

use std::borrow::Cow;

use serde::de::IgnoredAny;

use super::image::{is_base64, Attr, Image, OldImage};

/// Deeper than this, give up (serde_json itself refuses at 128).
const MAX_DEPTH: u32 = 100;

/// Where the plain run of string bytes starting at `i` ends: at the first quote, backslash or
/// control character, or where fewer than eight bytes are left. Eight bytes at a time, with the
/// usual bit tricks: of the bytes flagged, the lowest is always a true match.
fn plain_run_end(bytes: &[u8], mut i: usize) -> usize {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGHS: u64 = 0x8080_8080_8080_8080;
    let zero_at = |w: u64| w.wrapping_sub(ONES) & !w;
    while let Some(chunk) = bytes.get(i..i + 8) {
        let w = u64::from_le_bytes(chunk.try_into().expect("eight bytes"));
        let below_space = w.wrapping_sub(ONES * 0x20) & !w;
        let hits = (zero_at(w ^ (ONES * u64::from(b'"')))
            | zero_at(w ^ (ONES * u64::from(b'\\')))
            | below_space)
            & HIGHS;
        if hits != 0 {
            return i + (hits.trailing_zeros() / 8) as usize;
        }
        i += 8;
    }
    i
}

pub struct Reader<'a> {
    text: &'a str,
    at: usize,
    depth: u32,
}

impl<'a> Reader<'a> {
    pub fn new(text: &'a str) -> Self {
        Reader {
            text,
            at: 0,
            depth: 0,
        }
    }

    fn bytes(&self) -> &'a [u8] {
        self.text.as_bytes()
    }

    /// The next byte after whitespace, not taken.
    pub fn peek(&mut self) -> Option<u8> {
        let bytes = self.bytes();
        while let Some(&b) = bytes.get(self.at) {
            if !matches!(b, b' ' | b'\n' | b'\r' | b'\t') {
                return Some(b);
            }
            self.at += 1;
        }
        None
    }

    /// Takes `b`, after whitespace.
    pub fn eat(&mut self, b: u8) -> Option<()> {
        (self.peek()? == b).then(|| self.at += 1)
    }

    /// Nothing but whitespace is left.
    pub fn end(&mut self) -> Option<()> {
        self.peek().is_none().then_some(())
    }

    /// Takes `word` (a literal) when it comes next.
    fn literal(&mut self, word: &[u8]) -> Option<()> {
        let rest = &self.bytes()[self.at..];
        rest.starts_with(word).then(|| self.at += word.len())
    }

    /// Takes `null` when it comes next.
    pub fn null(&mut self) -> bool {
        self.peek() == Some(b'n') && self.literal(b"null").is_some()
    }

    /// A string, borrowed unless it holds escapes.
    pub fn string(&mut self) -> Option<Cow<'a, str>> {
        self.eat(b'"')?;
        let start = self.at;
        let bytes = self.bytes();
        let mut escaped = false;
        let mut i = start;
        loop {
            i = plain_run_end(bytes, i);
            match *bytes.get(i)? {
                b'"' => break,
                b'\\' => {
                    escaped = true;
                    i += 2;
                }
                b if b < 0x20 => return None,
                _ => i += 1,
            }
        }
        self.at = i + 1;
        if escaped {
            // Quotes and backslashes are ASCII: the slice is on character boundaries.
            serde_json::from_str(&self.text[start - 1..=i])
                .ok()
                .map(Cow::Owned)
        } else {
            Some(Cow::Borrowed(&self.text[start..i]))
        }
    }

    /// The bytes a number can be made of, taken unchecked.
    fn number_run(&mut self) -> Option<&'a str> {
        self.peek()?;
        let start = self.at;
        let rest = &self.bytes()[start..];
        let len = rest
            .iter()
            .position(|b| !matches!(b, b'0'..=b'9' | b'-' | b'+' | b'.' | b'e' | b'E'))
            .unwrap_or(rest.len());
        self.at += len;
        Some(&self.text[start..start + len])
    }

    /// A number's text, checked by serde_json.
    fn number_text(&mut self) -> Option<&'a str> {
        let text = self.number_run()?;
        serde_json::from_str::<IgnoredAny>(text).ok()?;
        Some(text)
    }

    /// A number, or `null` for none.
    pub fn optional_f64(&mut self) -> Option<Option<f64>> {
        if self.null() {
            return Some(None);
        }
        serde_json::from_str(self.number_run()?).ok().map(Some)
    }

    /// A string, or `null` for none.
    pub fn optional_string(&mut self) -> Option<Option<Cow<'a, str>>> {
        if self.null() {
            return Some(None);
        }
        self.string().map(Some)
    }

    fn nested<T>(&mut self, read: impl FnOnce(&mut Self) -> Option<T>) -> Option<T> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return None;
        }
        let value = read(self);
        self.depth -= 1;
        value
    }

    /// An object, each member handed to `member` with its name.
    pub fn object(
        &mut self,
        mut member: impl FnMut(&mut Self, Cow<'a, str>) -> Option<()>,
    ) -> Option<()> {
        self.sequence(b'{', b'}', |r| {
            let name = r.string()?;
            r.eat(b':')?;
            member(r, name)
        })
    }

    /// An array, each element handed to `element`.
    pub fn array(&mut self, element: impl FnMut(&mut Self) -> Option<()>) -> Option<()> {
        self.sequence(b'[', b']', element)
    }

    /// `open`, items separated by commas, `close`: what objects and arrays share.
    fn sequence(
        &mut self,
        open: u8,
        close: u8,
        mut item: impl FnMut(&mut Self) -> Option<()>,
    ) -> Option<()> {
        self.eat(open)?;
        self.nested(|r| {
            if r.eat(close).is_some() {
                return Some(());
            }
            loop {
                item(r)?;
                match r.peek()? {
                    b',' => r.at += 1,
                    b if b == close => {
                        r.at += 1;
                        break Some(());
                    }
                    _ => return None,
                }
            }
        })
    }

    /// Any value, read and dropped.
    pub fn skip(&mut self) -> Option<()> {
        match self.peek()? {
            b'"' => self.string().map(drop),
            b'{' => self.object(|r, _| r.skip()),
            b'[' => self.array(Self::skip),
            b't' => self.literal(b"true"),
            b'f' => self.literal(b"false"),
            b'n' => self.literal(b"null"),
            _ => self.number_text().map(drop),
        }
    }

    /// An item or `M` value; `null` is empty, as serde reads it.
    pub fn image(&mut self) -> Option<Image<'a>> {
        if self.null() {
            return Some(Image::default());
        }
        let mut entries = Vec::with_capacity(8);
        self.object(|r, name| {
            entries.push((name, r.attr()?));
            Some(())
        })?;
        Some(Image::new(entries))
    }

    fn strings(&mut self) -> Option<Vec<Cow<'a, str>>> {
        let mut items = Vec::new();
        self.array(|r| {
            items.push(r.string()?);
            Some(())
        })?;
        Some(items)
    }

    /// One attribute value: an object of exactly one type.
    pub fn attr(&mut self) -> Option<Attr<'a>> {
        self.eat(b'{')?;
        let value = self.nested(|r| {
            let kind = r.string()?;
            r.eat(b':')?;
            Some(match &*kind {
                "S" => Attr::S(r.string()?),
                "N" => Attr::N(r.string()?),
                "B" => {
                    let text = r.string()?;
                    is_base64(&text).ok()?;
                    Attr::B(text)
                }
                "BOOL" => match r.peek()? {
                    b't' => r.literal(b"true").map(|_| Attr::Bool(true))?,
                    _ => r.literal(b"false").map(|_| Attr::Bool(false))?,
                },
                "NULL" => r.skip().map(|_| Attr::Null)?,
                "M" => Attr::M(r.image()?),
                "L" => {
                    let mut items = Vec::new();
                    r.array(|r| {
                        items.push(r.attr()?);
                        Some(())
                    })?;
                    Attr::L(items)
                }
                "SS" => Attr::Ss(r.strings()?),
                "NS" => Attr::Ns(r.strings()?),
                "BS" => {
                    let set = r.strings()?;
                    set.iter().try_for_each(|t| is_base64(t).ok())?;
                    Attr::Bs(set)
                }
                _ => return None,
            })
        })?;
        self.eat(b'}')?;
        Some(value)
    }

    /// Of an old image, whether there was one and its shop id, the rest skipped.
    pub fn old_image(&mut self) -> Option<OldImage> {
        let mut old = OldImage::default();
        if self.null() {
            return Some(old);
        }
        self.object(|r, name| {
            old.present = true;
            if name != "shop_id" {
                return r.skip();
            }
            if let Attr::S(shop) = r.attr()? {
                old.shop_id = Some(shop.into_owned()).filter(|s| !s.is_empty());
            }
            Some(())
        })?;
        Some(old)
    }
}

#[cfg(test)]
mod tests {
    use serde::Deserialize;

    use super::*;

    fn both<'a, T: Deserialize<'a> + PartialEq + std::fmt::Debug>(
        text: &'a str,
        read: impl FnOnce(&mut Reader<'a>) -> Option<T>,
    ) -> (Option<T>, Option<T>) {
        let mut reader = Reader::new(text);
        let fast = read(&mut reader).filter(|_| reader.end().is_some());
        (fast, serde_json::from_str::<T>(text).ok())
    }

    #[test]
    fn images_read_as_serde_reads_them() {
        let images = [
            r#"{"pk": {"S": "a"}, "n": {"N": "1.5"}, "b": {"B": "AAEC"}, "t": {"BOOL": true}}"#,
            r#"{"z": {"NULL": true}, "ss": {"SS": ["a", "\"q\""]}, "ns": {"NS": ["1"]}}"#,
            r#"{"m": {"M": {"y": {"L": [{"S": "é\u00e9\n"}, {"N": "0"}]}, "x": {"M": null}}}}"#,
            r#" { "bs" : { "BS" : [ "AA==" ] } , "a" : { "L" : [ ] } , "e" : { "M" : { } } } "#,
            r#"{"a": {"S": "1"}, "a": {"S": "2"}, "\u0061b": {"S": "x\ty"}}"#,
            "null",
            "{}",
        ];
        for text in images {
            let (fast, serde) = both::<Image>(text, Reader::image);
            assert!(fast.is_some(), "{text}");
            assert_eq!(fast, serde, "{text}");
        }
    }

    #[test]
    fn what_serde_refuses_the_reader_gives_up_on() {
        let refused = [
            r#"{"a": {"X": "1"}}"#,
            r#"{"a": {"S": "1", "N": "1"}}"#,
            r#"{"a": {}}"#,
            r#"{"a": {"B": "not base64!"}}"#,
            r#"{"a": {"BS": ["AA==", "not base64!"]}}"#,
            r#"{"a": {"S": 1}}"#,
            r#"{"a": {"S": null}}"#,
            r#"{"a": {"L": null}}"#,
            r#"{"a": {"BOOL": 1}}"#,
            r#"{"a": {"S": "1"},}"#,
            r#"{"a": {"L": [{"S": "1"},]}}"#,
            r#"{"a": {"S": "bad \x escape"}}"#,
            "{\"a\": {\"S\": \"raw \n newline\"}}",
            r#"{"a": {"NULL": 01}}"#,
            r#"{"a": {"NULL": -}}"#,
            r#"{"a" {"S": "1"}}"#,
            r#"{"a": {"S": "1"}"#,
            r#"{"a": {"S": "\ud800"}}"#,
        ];
        for text in refused {
            let (fast, serde) = both::<Image>(text, Reader::image);
            assert_eq!((fast, serde), (None, None), "{text}");
        }
    }

    #[test]
    fn plain_runs_end_at_the_first_quote_backslash_or_control() {
        let cases: [&[u8]; 6] = [
            b"abcdefghijklmnop\"",
            b"abcdefgh\\ijklmnop",
            b"abc\x01defghijklmnop",
            b"\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9\"x",
            b"a\x1f\"\\aaaaaaaaaa",
            b"short\"",
        ];
        for bytes in cases {
            let first = bytes
                .iter()
                .position(|&b| b == b'"' || b == b'\\' || b < 0x20)
                .unwrap();
            let end = plain_run_end(bytes, 0);
            // Either the first stop, or a tail of fewer than eight bytes before it.
            assert!(
                end == first || (end < first && bytes.len() - end < 8),
                "{bytes:?}"
            );
        }
        assert_eq!(plain_run_end(b"\x7f\x80\xff abcdefgh", 0), 8);
    }

    #[test]
    fn old_images_keep_only_their_shop() {
        let texts = [
            r#"{"shop_id": {"S": "s-1"}, "big": {"M": {"x": {"N": "1"}}}, "n": [1, -2.5e3, true]}"#,
            r#"{"shop_id": {"S": "s-1"}, "shop_id": {"N": "1"}}"#,
            r#"{"shop_id": {"S": ""}}"#,
            r#"{}"#,
            "null",
        ];
        for text in texts {
            let (fast, serde) = both::<OldImage>(text, Reader::old_image);
            assert!(fast.is_some(), "{text}");
            assert_eq!(fast, serde, "{text}");
        }
        let (fast, serde) = both::<OldImage>(r#"{"x": [1,]}"#, Reader::old_image);
        assert_eq!((fast, serde), (None, None));
    }

    #[test]
    fn nesting_deeper_than_serde_allows_is_given_up() {
        let deep = format!(
            "{{\"a\": {}{{\"S\": \"x\"}}{}}}",
            "{\"L\": [".repeat(150),
            "]}".repeat(150)
        );
        let (fast, serde) = both::<Image>(&deep, Reader::image);
        assert_eq!((fast, serde), (None, None));
        let shallow = deep.replacen(&"{\"L\": [".repeat(110), "", 1);
        let shallow = shallow.replacen(&"]}".repeat(110), "", 1);
        let (fast, serde) = both::<Image>(&shallow, Reader::image);
        assert!(fast.is_some());
        assert_eq!(fast, serde);
    }
}
