//! The one codec for persisted records and wire frames: bincode 2 with a format
//! version byte in front and a hard byte limit on every decode.
//!
//! A record is `[version: u8][bincode body]`. Decoding refuses an unknown version, a body
//! larger than the limit, and trailing bytes, so a damaged or hostile record becomes an
//! error and never an allocation past the limit.

use bincode::{Decode, Encode};

/// Largest record any store table holds.
pub const RECORD_BYTES_MAX: usize = 64 * 1024;

/// Why a record could not be decoded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CodecError {
    /// Empty input.
    #[error("empty record")]
    Empty,
    /// A version this build does not read.
    #[error("record format version {found}, this build reads {expected}")]
    Version {
        /// In the record.
        found: u8,
        /// Understood.
        expected: u8,
    },
    /// Over the byte limit.
    #[error("record of {0} bytes exceeds the limit")]
    TooLarge(usize),
    /// Bincode refused the body.
    #[error("malformed record: {0}")]
    Malformed(String),
    /// Bytes after the body.
    #[error("{0} trailing bytes after the record")]
    Trailing(usize),
}

type Limited<const LIMIT: usize> = bincode::config::Configuration<
    bincode::config::LittleEndian,
    bincode::config::Varint,
    bincode::config::Limit<LIMIT>,
>;

fn config<const LIMIT: usize>() -> Limited<LIMIT> {
    bincode::config::standard().with_limit::<LIMIT>()
}

/// Encodes `value` as a store record of format `version` (at most [`RECORD_BYTES_MAX`]).
///
/// # Panics
/// If the encoding exceeds the limit: records are small by construction.
pub fn encode<T: Encode>(version: u8, value: &T) -> Vec<u8> {
    encode_limited::<T, RECORD_BYTES_MAX>(version, value)
}

/// Encodes `value` with format `version` first, its body within `LIMIT` bytes.
///
/// # Panics
/// If the encoding exceeds `LIMIT`: callers bound what they encode.
pub fn encode_limited<T: Encode, const LIMIT: usize>(version: u8, value: &T) -> Vec<u8> {
    let mut out = vec![version];
    let body =
        bincode::encode_to_vec(value, config::<LIMIT>()).expect("values encode within their limit");
    out.extend_from_slice(&body);
    assert!(out.len() <= LIMIT + 1, "record of {} bytes, limit {LIMIT}", out.len());
    out
}

/// Decodes a store record of format `version` (at most [`RECORD_BYTES_MAX`]).
///
/// # Errors
/// [`CodecError`] for a wrong version, oversized, malformed or trailing input.
pub fn decode<T: Decode<()>>(version: u8, bytes: &[u8]) -> Result<T, CodecError> {
    decode_limited::<T, RECORD_BYTES_MAX>(version, bytes)
}

/// Decodes a value of format `version` whose body is at most `LIMIT` bytes.
///
/// # Errors
/// [`CodecError`] for a wrong version, oversized, malformed or trailing input.
pub fn decode_limited<T: Decode<()>, const LIMIT: usize>(
    version: u8,
    bytes: &[u8],
) -> Result<T, CodecError> {
    let (&found, body) = bytes.split_first().ok_or(CodecError::Empty)?;
    if found != version {
        return Err(CodecError::Version { found, expected: version });
    }
    if body.len() > LIMIT {
        return Err(CodecError::TooLarge(bytes.len()));
    }
    let (value, used) = bincode::decode_from_slice(body, config::<LIMIT>())
        .map_err(|e| CodecError::Malformed(e.to_string()))?;
    if used != body.len() {
        return Err(CodecError::Trailing(body.len() - used));
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Encode, Decode, Debug, PartialEq)]
    struct Sample {
        name: String,
        items: Vec<u64>,
    }

    #[test]
    fn records_round_trip_and_refuse_damage() {
        // A record decodes to itself; a wrong version, truncation, trailing bytes and a
        // length claiming gigabytes are errors.
        let s = Sample { name: "x".into(), items: vec![1, 2, 300] };
        let bytes = encode(1, &s);
        assert_eq!(decode::<Sample>(1, &bytes).unwrap(), s);
        assert!(matches!(decode::<Sample>(2, &bytes), Err(CodecError::Version { .. })));
        assert!(decode::<Sample>(1, &bytes[..bytes.len() - 1]).is_err());
        let mut long = bytes.clone();
        long.push(0);
        assert!(matches!(decode::<Sample>(1, &long), Err(CodecError::Trailing(1))));
        let huge = [1u8, 1, b'x', 0xfd, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x0f];
        assert!(decode::<Sample>(1, &huge).is_err());
        assert!(matches!(decode::<Sample>(1, &[]), Err(CodecError::Empty)));
    }
}
