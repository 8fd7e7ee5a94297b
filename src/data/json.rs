//! Reading whole-file JSON formats (few-shot, CLINC150) with typed serde structs.

use std::fmt;
use std::marker::PhantomData;
use std::path::Path;

use serde::de::{DeserializeOwned, MapAccess, Visitor};
use serde::{Deserialize, Deserializer};

use super::DataError;

/// A JSON object kept in file order (serde_json's map would sort the keys).
pub(crate) struct OrderedMap<V>(pub Vec<(String, V)>);

impl<'de, V: Deserialize<'de>> Deserialize<'de> for OrderedMap<V> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V_<V>(PhantomData<V>);
        impl<'de, V: Deserialize<'de>> Visitor<'de> for V_<V> {
            type Value = OrderedMap<V>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<Self::Value, A::Error> {
                let mut out = Vec::new();
                while let Some(entry) = m.next_entry()? {
                    out.push(entry);
                }
                Ok(OrderedMap(out))
            }
        }
        d.deserialize_map(V_(PhantomData))
    }
}

/// Parses a whole JSON file, streaming from a buffered reader.
pub(crate) fn read_json<T: DeserializeOwned>(path: &Path) -> Result<T, DataError> {
    let file = std::fs::File::open(path).map_err(|e| DataError::io(path, e))?;
    let reader = std::io::BufReader::with_capacity(1 << 16, file);
    serde_json::from_reader(reader).map_err(|e| {
        if e.is_io() {
            DataError::io(path, std::io::Error::other(e.to_string()))
        } else {
            DataError::json(path, 1, &e)
        }
    })
}
