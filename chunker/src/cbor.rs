//! A strict, deterministic DAG-CBOR codec for manifest nodes.
//!
//! Encoding follows the DAG-CBOR rules, so third-party IPLD decoders read every block and
//! re-encode it byte for byte: shortest integer and length heads, definite lengths only,
//! map keys are text and sorted length-first then bytewise, links are tag 42 over the
//! binary CID with a leading zero byte, no floats. Decoding accepts exactly that form and
//! nothing else, with bounded depth and sizes, and never panics on input.

use crate::Cid;

/// Deepest nesting accepted when decoding.
const DEPTH_MAX: usize = 16;

/// A DAG-CBOR value (the subset manifests use).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Value {
    /// `null`.
    Null,
    /// A boolean.
    Bool(bool),
    /// A non-negative integer.
    Uint(u64),
    /// A negative integer, stored as -1 - n.
    Nint(u64),
    /// A byte string.
    Bytes(Vec<u8>),
    /// A text string.
    Text(String),
    /// A list.
    List(Vec<Value>),
    /// A map with text keys; kept in canonical order by [`Value::map`].
    Map(Vec<(String, Value)>),
    /// A link (tag 42).
    Link(Cid),
}

/// Why bytes are not a canonical DAG-CBOR block of the accepted subset.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum DecodeError {
    /// Input ended inside an item.
    #[error("truncated at byte {0}")]
    Truncated(usize),
    /// Bytes left after the top-level item.
    #[error("trailing bytes at {0}")]
    Trailing(usize),
    /// A form DAG-CBOR forbids or the subset does not use.
    #[error("non-canonical or unsupported CBOR at byte {at}: {what}")]
    Form {
        /// Offset.
        at: usize,
        /// What was wrong.
        what: &'static str,
    },
    /// Nesting past the limit.
    #[error("nesting deeper than {DEPTH_MAX}")]
    Depth,
    /// A tag-42 link that is not a usable CID.
    #[error("bad link at byte {0}")]
    Link(usize),
}

impl Value {
    /// A map from entries in any order: sorts them into DAG-CBOR key order.
    ///
    /// # Panics
    /// On a duplicate key: callers build maps from distinct field names.
    pub fn map(mut entries: Vec<(String, Value)>) -> Value {
        entries.sort_by(|a, b| key_order(&a.0, &b.0));
        for pair in entries.windows(2) {
            assert!(pair[0].0 != pair[1].0, "duplicate key {}", pair[0].0);
        }
        Value::Map(entries)
    }

    /// The value under `key` in a map.
    pub fn field(&self, key: &str) -> Option<&Value> {
        match self {
            Value::Map(entries) => entries.iter().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        }
    }

    /// Encodes canonically.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.encode_into(&mut out);
        out
    }

    /// Appends the canonical encoding to `out`.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        match self {
            Value::Null => out.push(0xf6),
            Value::Bool(false) => out.push(0xf4),
            Value::Bool(true) => out.push(0xf5),
            Value::Uint(n) => head(out, 0, *n),
            Value::Nint(n) => head(out, 1, *n),
            Value::Bytes(b) => {
                head(out, 2, b.len() as u64);
                out.extend_from_slice(b);
            }
            Value::Text(s) => {
                head(out, 3, s.len() as u64);
                out.extend_from_slice(s.as_bytes());
            }
            Value::List(items) => {
                head(out, 4, items.len() as u64);
                for item in items {
                    item.encode_into(out);
                }
            }
            Value::Map(entries) => {
                head(out, 5, entries.len() as u64);
                for (k, v) in entries {
                    head(out, 3, k.len() as u64);
                    out.extend_from_slice(k.as_bytes());
                    v.encode_into(out);
                }
            }
            Value::Link(cid) => {
                head(out, 6, 42);
                head(out, 2, Cid::BYTES as u64 + 1);
                out.push(0);
                out.extend_from_slice(&cid.to_bytes());
            }
        }
    }

    /// Decodes one canonical block.
    ///
    /// # Errors
    /// [`DecodeError`] for anything but the canonical encoding of an accepted value.
    pub fn decode(bytes: &[u8]) -> Result<Value, DecodeError> {
        let mut reader = Reader { bytes, at: 0 };
        let value = reader.value(0)?;
        if reader.at != bytes.len() {
            return Err(DecodeError::Trailing(reader.at));
        }
        Ok(value)
    }

    /// The encoded length of a head for `n` (1, 2, 3, 5 or 9 bytes).
    pub fn head_bytes(n: u64) -> usize {
        match n {
            0..=23 => 1,
            24..=0xff => 2,
            0x100..=0xffff => 3,
            0x1_0000..=0xffff_ffff => 5,
            _ => 9,
        }
    }
}

fn key_order(a: &str, b: &str) -> std::cmp::Ordering {
    a.len().cmp(&b.len()).then_with(|| a.as_bytes().cmp(b.as_bytes()))
}

fn head(out: &mut Vec<u8>, major: u8, n: u64) {
    let m = major << 5;
    match n {
        0..=23 => out.push(m | n as u8),
        24..=0xff => out.extend_from_slice(&[m | 24, n as u8]),
        0x100..=0xffff => {
            out.push(m | 25);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        0x1_0000..=0xffff_ffff => {
            out.push(m | 26);
            out.extend_from_slice(&(n as u32).to_be_bytes());
        }
        _ => {
            out.push(m | 27);
            out.extend_from_slice(&n.to_be_bytes());
        }
    }
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], DecodeError> {
        let end = self.at.checked_add(n).ok_or(DecodeError::Truncated(self.at))?;
        let slice = self.bytes.get(self.at..end).ok_or(DecodeError::Truncated(self.at))?;
        self.at = end;
        Ok(slice)
    }

    fn form(&self, at: usize, what: &'static str) -> DecodeError {
        DecodeError::Form { at, what }
    }

    /// Reads a head; returns (major, argument) and rejects non-shortest forms.
    fn head(&mut self) -> Result<(u8, u64), DecodeError> {
        let start = self.at;
        let first = self.take(1)?[0];
        let major = first >> 5;
        let info = first & 0x1f;
        let n = match info {
            0..=23 => u64::from(info),
            24 => u64::from(self.take(1)?[0]),
            25 => u64::from(u16::from_be_bytes(self.take(2)?.try_into().expect("2 bytes"))),
            26 => u64::from(u32::from_be_bytes(self.take(4)?.try_into().expect("4 bytes"))),
            27 => u64::from_be_bytes(self.take(8)?.try_into().expect("8 bytes")),
            _ => return Err(self.form(start, "indefinite length or reserved head")),
        };
        if major != 7 && Value::head_bytes(n) != self.at - start {
            return Err(self.form(start, "integer or length not in shortest form"));
        }
        Ok((major, n))
    }

    fn len(&self, n: u64) -> Result<usize, DecodeError> {
        // Every item takes at least one byte, so no length can exceed what is left.
        let left = self.bytes.len() - self.at;
        usize::try_from(n).ok().filter(|&n| n <= left).ok_or(DecodeError::Truncated(self.at))
    }

    fn value(&mut self, depth: usize) -> Result<Value, DecodeError> {
        if depth > DEPTH_MAX {
            return Err(DecodeError::Depth);
        }
        let start = self.at;
        let (major, n) = self.head()?;
        Ok(match major {
            0 => Value::Uint(n),
            1 => Value::Nint(n),
            2 => {
                let len = self.len(n)?;
                Value::Bytes(self.take(len)?.to_vec())
            }
            3 => Value::Text(self.text(n, start)?),
            4 => {
                let len = self.len(n)?;
                let mut items = Vec::with_capacity(len);
                for _ in 0..len {
                    items.push(self.value(depth + 1)?);
                }
                Value::List(items)
            }
            5 => {
                let len = self.len(n)?;
                let mut entries: Vec<(String, Value)> = Vec::with_capacity(len);
                for _ in 0..len {
                    let key_at = self.at;
                    let (kmajor, klen) = self.head()?;
                    if kmajor != 3 {
                        return Err(self.form(key_at, "map key is not text"));
                    }
                    let key = self.text(klen, key_at)?;
                    if let Some((prev, _)) = entries.last()
                        && key_order(prev, &key) != std::cmp::Ordering::Less
                    {
                        return Err(self.form(key_at, "map keys unsorted or duplicated"));
                    }
                    let value = self.value(depth + 1)?;
                    entries.push((key, value));
                }
                Value::Map(entries)
            }
            6 => {
                if n != 42 {
                    return Err(self.form(start, "tag other than 42"));
                }
                let (bmajor, blen) = self.head()?;
                if bmajor != 2 || blen != Cid::BYTES as u64 + 1 {
                    return Err(DecodeError::Link(start));
                }
                let body = self.take(Cid::BYTES + 1)?;
                if body[0] != 0 {
                    return Err(DecodeError::Link(start));
                }
                Value::Link(Cid::from_bytes(&body[1..]).map_err(|_| DecodeError::Link(start))?)
            }
            _ => match (self.bytes[start], n) {
                (0xf4, _) => Value::Bool(false),
                (0xf5, _) => Value::Bool(true),
                (0xf6, _) => Value::Null,
                _ => return Err(self.form(start, "float, undefined or simple value")),
            },
        })
    }

    fn text(&mut self, n: u64, start: usize) -> Result<String, DecodeError> {
        let len = self.len(n)?;
        let raw = self.take(len)?;
        String::from_utf8(raw.to_vec()).map_err(|_| self.form(start, "text is not UTF-8"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn arb_value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<u64>().prop_map(Value::Uint),
            any::<u64>().prop_map(Value::Nint),
            proptest::collection::vec(any::<u8>(), 0..40).prop_map(Value::Bytes),
            "[a-z]{0,12}".prop_map(Value::Text),
            any::<[u8; 32]>().prop_map(|d| Value::Link(Cid::from_digest(crate::Codec::Raw, d))),
        ];
        leaf.prop_recursive(4, 64, 8, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..8).prop_map(Value::List),
                proptest::collection::btree_map("[a-z]{1,6}", inner, 0..6)
                    .prop_map(|m| Value::map(m.into_iter().collect())),
            ]
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig {
            cases: 512,
            rng_algorithm: proptest::test_runner::RngAlgorithm::ChaCha,
            ..ProptestConfig::default()
        })]
        #[test]
        fn encode_decode_round_trips(v in arb_value()) {
            // Every value decodes back to itself and re-encodes to the same bytes.
            let bytes = v.encode();
            let back = Value::decode(&bytes).unwrap();
            prop_assert_eq!(&back, &v);
            prop_assert_eq!(back.encode(), bytes);
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            // Decoding garbage returns an error or a value that re-encodes to the same bytes.
            if let Ok(v) = Value::decode(&bytes) {
                prop_assert_eq!(v.encode(), bytes);
            }
        }
    }

    #[test]
    fn non_canonical_forms_are_rejected() {
        // Long-form small ints, indefinite lengths, unsorted keys, floats and other tags.
        assert!(Value::decode(&[0x18, 0x05]).is_err());
        assert!(Value::decode(&[0x9f, 0xff]).is_err());
        let unsorted = [0xa2, 0x62, b'a', b'a', 0x01, 0x61, b'b', 0x02];
        assert!(Value::decode(&unsorted).is_err());
        assert!(Value::decode(&[0xf9, 0x3c, 0x00]).is_err());
        assert!(Value::decode(&[0xc1, 0x01]).is_err());
        assert!(Value::decode(&[0x01, 0x01]).is_err());
        // A list claiming 2^63 items fails without allocating.
        assert!(Value::decode(&[0x9b, 0x80, 0, 0, 0, 0, 0, 0, 0]).is_err());
        // Deep nesting is an error, not a stack overflow.
        assert_eq!(Value::decode(&[0x81; 10_000]), Err(DecodeError::Depth));
    }

    #[test]
    fn keys_sort_length_first() {
        // DAG-CBOR orders "b" before "aa".
        let v = Value::map(vec![("aa".into(), Value::Uint(1)), ("b".into(), Value::Uint(2))]);
        assert_eq!(v.encode(), vec![0xa2, 0x61, b'b', 0x02, 0x62, b'a', b'a', 0x01]);
    }
}
