//! Typed parts of an item (`index_aliases`, `add_docs_config`) read straight from the attribute
//! tree, as serde_json would read the same value written as JSON ([`super::json`]), without
//! writing and parsing that text. Numbers are parsed by serde_json itself, so a weight comes
//! out exactly as it would from the JSON text.

use serde::de::value::{MapDeserializer, SeqDeserializer};
use serde::de::{Deserializer, IntoDeserializer, Visitor};
use serde::forward_to_deserialize_any;

use super::image::Attr;

/// A deserializer over one attribute value. Errors only say that it failed: the caller reads
/// a failing value again through its JSON text, for the path and reason.
pub struct AttrDeserializer<'de, 'a>(pub &'de Attr<'a>);

impl<'de, 'a> IntoDeserializer<'de, serde_json::Error> for AttrDeserializer<'de, 'a> {
    type Deserializer = Self;

    fn into_deserializer(self) -> Self {
        self
    }
}

fn number<'de, V: Visitor<'de>>(text: &'de str, visitor: V) -> Result<V::Value, serde_json::Error> {
    let mut json = serde_json::Deserializer::from_str(text);
    let value = json.deserialize_any(visitor)?;
    json.end()?;
    Ok(value)
}

fn texts<'de, 'a: 'de>(
    items: &'de [std::borrow::Cow<'a, str>],
) -> impl Iterator<Item = &'de str> + 'de {
    items.iter().map(|s| &**s)
}

impl<'de, 'a: 'de> Deserializer<'de> for AttrDeserializer<'de, 'a> {
    type Error = serde_json::Error;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Self::Error> {
        match self.0 {
            Attr::S(s) | Attr::B(s) => visitor.visit_borrowed_str(s),
            Attr::N(n) => number(n, visitor),
            Attr::Bool(b) => visitor.visit_bool(*b),
            Attr::Null => visitor.visit_unit(),
            Attr::M(map) => {
                let entries = map
                    .iter()
                    .map(|(name, value)| (name, AttrDeserializer(value)));
                let mut access = MapDeserializer::new(entries);
                let value = visitor.visit_map(&mut access)?;
                access.end()?;
                Ok(value)
            }
            Attr::L(items) => {
                let mut access = SeqDeserializer::new(items.iter().map(AttrDeserializer));
                let value = visitor.visit_seq(&mut access)?;
                access.end()?;
                Ok(value)
            }
            Attr::Ss(items) | Attr::Bs(items) => {
                let mut access = SeqDeserializer::new(texts(items));
                let value = visitor.visit_seq(&mut access)?;
                access.end()?;
                Ok(value)
            }
            Attr::Ns(items) => {
                let numbers = items.iter().map(|n| NumberText(n));
                let mut access = SeqDeserializer::new(numbers);
                let value = visitor.visit_seq(&mut access)?;
                access.end()?;
                Ok(value)
            }
        }
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Self::Error> {
        match self.0 {
            Attr::Null => visitor.visit_none(),
            _ => visitor.visit_some(self),
        }
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, Self::Error> {
        visitor.visit_newtype_struct(self)
    }

    forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
        unit unit_struct seq tuple tuple_struct map struct enum identifier ignored_any
    }
}

/// One number of an `NS` set.
struct NumberText<'de>(&'de str);

impl<'de> IntoDeserializer<'de, serde_json::Error> for NumberText<'de> {
    type Deserializer = Self;

    fn into_deserializer(self) -> Self {
        self
    }
}

impl<'de> Deserializer<'de> for NumberText<'de> {
    type Error = serde_json::Error;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Self::Error> {
        number(self.0, visitor)
    }

    forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
        option unit unit_struct newtype_struct seq tuple tuple_struct map struct enum
        identifier ignored_any
    }
}

#[cfg(test)]
mod tests {
    use serde::de::DeserializeOwned;
    use serde::Deserialize;
    use serde_json::{json, Value};

    use super::*;
    use crate::domain::settings::IndexAliases;
    use crate::dynamo::json::to_json;
    use crate::dynamo::Image;

    /// What the attribute gives, read directly and read through its JSON text.
    fn both<T: DeserializeOwned + std::fmt::Debug>(attr: &Value) -> (String, String) {
        let text = json!({ "a": attr }).to_string();
        let image: Image = serde_json::from_str(&text).unwrap();
        let attr = image.get("a").unwrap();
        let direct = T::deserialize(AttrDeserializer(attr)).map_err(|_| ());
        let via_text = serde_json::from_str::<T>(&to_json(attr, "a").unwrap()).map_err(|_| ());
        (format!("{direct:?}"), format!("{via_text:?}"))
    }

    #[test]
    fn values_read_directly_as_from_their_json_text() {
        let weights = [
            "1",
            "0.75",
            "1e2",
            "-0",
            "0.30000000000000004",
            "12345678901234567890123",
        ];
        for weight in weights {
            let aliases = json!({"M": {
                "doc_reads": {"M": {"enabled": {"BOOL": true}, "targets": {"L": [
                    {"M": {"index_id": {"S": "a-i"}, "weight": {"N": weight}, "x": {"SS": ["s"]}}}]}}},
                "analytics": {"M": {"enabled": {"BOOL": false}, "index_id": {"NULL": true}}},
                "doc_writes": {"M": {"targets": {"L": [{"M": {"index_id": {"S": "a-j"}}}]}}}
            }});
            let (direct, via_text) = both::<IndexAliases>(&aliases);
            assert_eq!(direct, via_text, "{weight}");
            assert!(direct.starts_with("Ok"), "{direct}");
            let (direct, via_text) = both::<Value>(&aliases);
            assert_eq!(direct, via_text, "{weight}");
        }
        let anything = json!({"L": [{"NS": ["1", "-2.5", "3e4"]}, {"BS": ["AAE="]}, {"B": "AA=="},
            {"NULL": true}, {"BOOL": false}, {"M": {"z": {"S": "é\"\n"}, "a": {"L": []}}}]});
        let (direct, via_text) = both::<Value>(&anything);
        assert_eq!(direct, via_text);
    }

    #[test]
    fn what_the_json_text_refuses_is_refused() {
        #[derive(Debug, Deserialize)]
        #[allow(dead_code)]
        struct Weights(Vec<f64>);
        let refused = [
            json!({"M": {"doc_reads": {"M": {"targets": {"L": [{"M": {"weight": {"S": "1"}}}]}}}}}),
            json!({"M": {"doc_reads": {"S": "x"}}}),
            json!({"M": {"analytics": {"M": {"enabled": {"N": "1"}}}}}),
            json!({"L": [{"S": "x"}]}),
        ];
        for attr in refused {
            let (direct, via_text) = both::<IndexAliases>(&attr);
            assert_eq!(
                (direct.as_str(), via_text.as_str()),
                ("Err(())", "Err(())"),
                "{attr}"
            );
        }
        let (direct, via_text) = both::<Weights>(&json!({"NS": ["1", "2.5"]}));
        assert_eq!(direct, via_text);
        assert_eq!(direct, "Ok(Weights([1.0, 2.5]))");
    }
}
