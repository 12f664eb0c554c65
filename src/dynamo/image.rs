//! An item's attributes in DynamoDB's attribute-value format, as a small tree that borrows its
//! text from a `serde_dynamo` item (a stream image, or a table item the SDK read), or from JSON
//! text in DynamoDB's format. Numbers stay as the text DynamoDB gives them, binary as base64.

use std::borrow::Cow;
use std::fmt;
use std::marker::PhantomData;

use base64::Engine as _;
use serde::de::{self, Deserialize, Deserializer, IgnoredAny, MapAccess, Visitor};
use serde_dynamo::{AttributeValue, Item};

/// One attribute value.
#[derive(Clone, Debug, PartialEq)]
pub enum Attr<'a> {
    S(Cow<'a, str>),
    /// The number's text, checked only when it is written out.
    N(Cow<'a, str>),
    /// Base64 text.
    B(Cow<'a, str>),
    Bool(bool),
    Null,
    M(Image<'a>),
    L(Vec<Attr<'a>>),
    Ss(Vec<Cow<'a, str>>),
    Ns(Vec<Cow<'a, str>>),
    Bs(Vec<Cow<'a, str>>),
}

impl Attr<'_> {
    /// DynamoDB's name of the value's type, for errors.
    pub fn type_name(&self) -> &'static str {
        match self {
            Attr::S(_) => "S",
            Attr::N(_) => "N",
            Attr::B(_) => "B",
            Attr::Bool(_) => "BOOL",
            Attr::Null => "NULL",
            Attr::M(_) => "M",
            Attr::L(_) => "L",
            Attr::Ss(_) => "SS",
            Attr::Ns(_) => "NS",
            Attr::Bs(_) => "BS",
        }
    }
}

/// A map of attributes (an item, an image, or an `M` value) in the order they came: an image
/// is looked up a dozen times and written out rarely, so it is sorted only when written.
#[derive(Clone, Debug, Default)]
pub struct Image<'a>(Vec<(Cow<'a, str>, Attr<'a>)>);

impl<'a> Image<'a> {
    pub(super) fn new(entries: Vec<(Cow<'a, str>, Attr<'a>)>) -> Self {
        Image(entries)
    }

    /// A table item, borrowed.
    pub fn of(item: &'a Item) -> Self {
        Image::new(
            item.iter()
                .map(|(name, value)| (Cow::Borrowed(name.as_str()), Attr::of(value)))
                .collect(),
        )
    }

    /// Of a name given twice the last one counts, as in a JSON object.
    pub fn get(&self, name: &str) -> Option<&Attr<'a>> {
        self.0.iter().rev().find(|(n, _)| n == name).map(|(_, v)| v)
    }

    /// A string attribute, if it is one.
    pub fn string(&self, name: &str) -> Option<&str> {
        match self.get(name) {
            Some(Attr::S(s)) => Some(s),
            _ => None,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Attributes in name order, each name once (the last given).
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Attr<'a>)> {
        let entries = &self.0;
        // Already in order (no name twice): listed as given; otherwise through a sorted index.
        let in_order = entries.windows(2).all(|w| w[0].0 < w[1].0);
        let (as_given, mut sorted) = match in_order {
            true => (&entries[..], Vec::new()),
            false => (&entries[..0], (0..entries.len()).rev().collect()),
        };
        sorted.sort_by(|&a, &b| entries[a].0.cmp(&entries[b].0)); // stable: the last first
        sorted.dedup_by(|later, first| entries[*later].0 == entries[*first].0);
        as_given
            .iter()
            .chain(sorted.into_iter().map(|i| &entries[i]))
            .map(|(name, value)| (&**name, value))
    }
}

/// Equal when they hold the same attributes, whatever the order they came in.
impl PartialEq for Image<'_> {
    fn eq(&self, other: &Self) -> bool {
        self.iter().eq(other.iter())
    }
}

impl<'a> Attr<'a> {
    fn of(value: &'a AttributeValue) -> Self {
        let text = |s: &'a String| Cow::Borrowed(s.as_str());
        let base64 = |b: &[u8]| Cow::Owned(base64::engine::general_purpose::STANDARD.encode(b));
        match value {
            AttributeValue::S(s) => Attr::S(text(s)),
            AttributeValue::N(n) => Attr::N(text(n)),
            AttributeValue::B(b) => Attr::B(base64(b)),
            AttributeValue::Bool(b) => Attr::Bool(*b),
            AttributeValue::Null(_) => Attr::Null,
            AttributeValue::M(map) => Attr::M(Image::new(
                map.iter()
                    .map(|(name, value)| (text(name), Attr::of(value)))
                    .collect(),
            )),
            AttributeValue::L(list) => Attr::L(list.iter().map(Attr::of).collect()),
            AttributeValue::Ss(set) => Attr::Ss(set.iter().map(text).collect()),
            AttributeValue::Ns(set) => Attr::Ns(set.iter().map(text).collect()),
            AttributeValue::Bs(set) => Attr::Bs(set.iter().map(|b| base64(b)).collect()),
        }
    }
}

/// A string borrowed from the JSON text when it holds no escapes.
#[derive(Debug)]
pub struct Text<'a>(pub Cow<'a, str>);

impl<'de: 'a, 'a> Deserialize<'de> for Text<'a> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct TextVisitor<'a>(PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for TextVisitor<'a> {
            type Value = Text<'a>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E: de::Error>(self, s: &'de str) -> Result<Self::Value, E> {
                Ok(Text(Cow::Borrowed(s)))
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Self::Value, E> {
                Ok(Text(Cow::Owned(s.to_owned())))
            }
            fn visit_string<E: de::Error>(self, s: String) -> Result<Self::Value, E> {
                Ok(Text(Cow::Owned(s)))
            }
        }
        deserializer.deserialize_str(TextVisitor(PhantomData))
    }
}

fn texts<'de: 'a, 'a, A: MapAccess<'de>>(map: &mut A) -> Result<Vec<Cow<'a, str>>, A::Error> {
    Ok(map
        .next_value::<Vec<Text<'a>>>()?
        .into_iter()
        .map(|t| t.0)
        .collect())
}

impl<'de: 'a, 'a> Deserialize<'de> for Attr<'a> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct AttrVisitor<'a>(PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for AttrVisitor<'a> {
            type Value = Attr<'a>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an attribute value such as {\"S\": \"text\"}")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let Some(Text(kind)) = map.next_key::<Text>()? else {
                    return Err(de::Error::custom("an attribute value needs a type"));
                };
                let value = match &*kind {
                    "S" => Attr::S(map.next_value::<Text>()?.0),
                    "N" => Attr::N(map.next_value::<Text>()?.0),
                    "B" => {
                        let text = map.next_value::<Text>()?.0;
                        is_base64(&text)
                            .map_err(|e| de::Error::custom(format!("B: not base64: {e}")))?;
                        Attr::B(text)
                    }
                    "BOOL" => Attr::Bool(map.next_value()?),
                    "NULL" => {
                        map.next_value::<IgnoredAny>()?;
                        Attr::Null
                    }
                    "M" => Attr::M(map.next_value()?),
                    "L" => Attr::L(map.next_value()?),
                    "SS" => Attr::Ss(texts(&mut map)?),
                    "NS" => Attr::Ns(texts(&mut map)?),
                    "BS" => {
                        let set = texts(&mut map)?;
                        if let Some(e) = set.iter().find_map(|t| is_base64(t).err()) {
                            return Err(de::Error::custom(format!("BS: not base64: {e}")));
                        }
                        Attr::Bs(set)
                    }
                    other => {
                        return Err(de::Error::custom(format!(
                            "unknown attribute type `{other}`"
                        )))
                    }
                };
                if map.next_key::<IgnoredAny>()?.is_some() {
                    return Err(de::Error::custom("an attribute value has exactly one type"));
                }
                Ok(value)
            }
        }
        deserializer.deserialize_map(AttrVisitor(PhantomData))
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for Image<'a> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ImageVisitor<'a>(PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for ImageVisitor<'a> {
            type Value = Image<'a>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a map of attribute names to attribute values")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut entries = Vec::with_capacity(map.size_hint().unwrap_or(8));
                while let Some(Text(name)) = map.next_key::<Text>()? {
                    entries.push((name, map.next_value::<Attr>()?));
                }
                Ok(Image::new(entries))
            }
            /// `null` is an absent image.
            fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
                Ok(Image::default())
            }
            fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
                Ok(Image::default())
            }
            fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
                d.deserialize_map(self)
            }
        }
        deserializer.deserialize_option(ImageVisitor(PhantomData))
    }
}

/// Binary arrives as base64 text and is written as given: it must be base64.
pub(crate) fn is_base64(text: &str) -> Result<(), base64::DecodeError> {
    base64::engine::general_purpose::STANDARD
        .decode(text.as_bytes())
        .map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn image(json: &str) -> Result<Image<'_>, serde_json::Error> {
        serde_json::from_str(json)
    }

    #[test]
    fn stream_images_and_table_items_read_the_same() {
        let text = json!({
            "pk": {"S": "acct-1"}, "n": {"N": "1.50"}, "b": {"B": "AAEC"}, "t": {"BOOL": true},
            "z": {"NULL": true}, "ss": {"SS": ["a", "\"q\""]}, "ns": {"NS": ["1", "2"]},
            "bs": {"BS": ["AA=="]}, "m": {"M": {"y": {"L": [{"S": "é"}, {"N": "0"}]}, "x": {"M": {}}}}
        })
        .to_string();
        let item =
            crate::dynamo::item_from_dynamodb_json(serde_json::from_str(&text).unwrap()).unwrap();
        let streamed = image(&text).unwrap();
        assert_eq!(streamed, Image::of(&item));
        let names: Vec<&str> = streamed.iter().map(|(name, _)| name).collect();
        assert_eq!(names, ["b", "bs", "m", "n", "ns", "pk", "ss", "t", "z"]);
        assert!(matches!(
            streamed.get("pk"),
            Some(Attr::S(Cow::Borrowed("acct-1")))
        ));
    }

    #[test]
    fn malformed_values_say_what_is_wrong() {
        let error = |json: &str| image(json).unwrap_err().to_string();
        assert!(error(r#"{"a": {"X": "1"}}"#).contains("unknown attribute type `X`"));
        assert!(error(r#"{"a": {"S": "1", "N": "1"}}"#).contains("exactly one type"));
        assert!(error(r#"{"a": {}}"#).contains("needs a type"));
        assert!(error(r#"{"a": {"B": "not base64!"}}"#).contains("not base64"));
        assert!(error(r#"{"a": {"BS": ["AA==", "not base64!"]}}"#).contains("BS: not base64"));
        assert!(error(r#"{"a": {"S": 1}}"#).contains("expected a string"));
    }

    #[test]
    fn repeated_names_keep_the_last_and_null_is_empty() {
        let repeated = image(r#"{"a": {"S": "1"}, "a": {"S": "2"}}"#).unwrap();
        assert_eq!(repeated.string("a"), Some("2"));
        let unsorted = image(r#"{"c": {"N": "1"}, "a": {"S": "1"}, "c": {"N": "2"}}"#).unwrap();
        let listed: Vec<(&str, &Attr)> = unsorted.iter().collect();
        assert_eq!(
            listed,
            [("a", &Attr::S("1".into())), ("c", &Attr::N("2".into()))]
        );
        assert!(image("null").unwrap().is_empty());
    }
}
