//! The chunker identity: every parameter that decides where content is cut.
//!
//! Two nodes only share chunks if they cut alike, so the whole identity travels in every
//! manifest and a manifest made with another identity is read correctly but never mixed
//! with this one's cut points.

use fastcdc::v2020 as cdc2020;

/// Disk-image holes are runs of whole 4 KiB blocks aligned to 4 KiB offsets.
pub const HOLE_ALIGN_BYTES: u64 = 4096;
/// No manifest node is larger than this, whatever it holds.
pub const NODE_BYTES_MAX: usize = 1 << 20;
/// Largest chunk any identity may ask for (disk images may use up to this).
pub const CHUNK_BYTES_MAX: u32 = 1 << 20;

const _: () = assert!(CHUNK_BYTES_MAX as usize <= NODE_BYTES_MAX);
const _: () = assert!(HOLE_ALIGN_BYTES.is_power_of_two());

/// Chunker identity and tree shape.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Config {
    /// Smallest chunk FastCDC cuts (the last chunk of a stream may be smaller).
    pub chunk_bytes_min: u32,
    /// Target average chunk size.
    pub chunk_bytes_avg: u32,
    /// Largest chunk.
    pub chunk_bytes_max: u32,
    /// FastCDC normalisation level (0..=3).
    pub normalization: u8,
    /// Disk images: an aligned all-zero run at least this long is a hole.
    pub zero_run_bytes: u64,
    /// Manifest index nodes are cut after an entry whose hash has this many low zero bits
    /// (average fan-out `2^fanout_bits`).
    pub fanout_bits: u8,
}

/// Why a chunker identity cannot be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConfigError {
    /// A size outside FastCDC's bounds or out of order.
    #[error(
        "invalid chunk sizes {min}/{avg}/{max}: need 64 <= min < avg < max <= 1 MiB, all even, avg >= 256"
    )]
    Sizes {
        /// Minimum.
        min: u32,
        /// Average.
        avg: u32,
        /// Maximum.
        max: u32,
    },
    /// Normalisation outside 0..=3.
    #[error("invalid normalisation level {0} (0..=3)")]
    Normalization(u8),
    /// Zero-run threshold not a positive multiple of 4 KiB.
    #[error("invalid zero-run threshold {0}: a positive multiple of 4096")]
    ZeroRun(u64),
    /// Fan-out bits outside 1..=16.
    #[error("invalid index fan-out bits {0} (1..=16)")]
    Fanout(u8),
}

impl Default for Config {
    fn default() -> Config {
        Config {
            chunk_bytes_min: 16 * 1024,
            chunk_bytes_avg: 64 * 1024,
            chunk_bytes_max: 256 * 1024,
            normalization: 1,
            zero_run_bytes: 64 * 1024,
            fanout_bits: 8,
        }
    }
}

impl Config {
    /// The FastCDC crate's major version: cut points changed between majors, so it is part
    /// of the identity.
    pub const FASTCDC_MAJOR: u32 = 5;
    /// The algorithm name recorded in manifests.
    pub const ALGORITHM: &'static str = "fastcdc-2020";

    /// Checks the identity.
    ///
    /// # Errors
    /// [`ConfigError`] naming the first parameter out of bounds.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let (min, avg, max) = (self.chunk_bytes_min, self.chunk_bytes_avg, self.chunk_bytes_max);
        let sizes_ok = min as usize >= cdc2020::MINIMUM_MIN
            && avg as usize >= cdc2020::AVERAGE_MIN
            && max as usize >= cdc2020::MAXIMUM_MIN
            && min < avg
            && avg < max
            && max <= CHUNK_BYTES_MAX
            && min % 2 == 0
            && avg % 2 == 0
            && max % 2 == 0;
        if !sizes_ok {
            return Err(ConfigError::Sizes { min, avg, max });
        }
        if self.normalization > 3 {
            return Err(ConfigError::Normalization(self.normalization));
        }
        if self.zero_run_bytes == 0 || !self.zero_run_bytes.is_multiple_of(HOLE_ALIGN_BYTES) {
            return Err(ConfigError::ZeroRun(self.zero_run_bytes));
        }
        if !(1..=16).contains(&self.fanout_bits) {
            return Err(ConfigError::Fanout(self.fanout_bits));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_is_valid_and_bad_identities_are_named() {
        // The default identity validates; each bad parameter is reported by its own variant.
        Config::default().validate().unwrap();
        let bad = Config { chunk_bytes_min: 10, ..Config::default() };
        assert!(matches!(bad.validate(), Err(ConfigError::Sizes { .. })));
        let bad = Config { chunk_bytes_max: 4 << 20, ..Config::default() };
        assert!(matches!(bad.validate(), Err(ConfigError::Sizes { .. })));
        let bad = Config { normalization: 4, ..Config::default() };
        assert_eq!(bad.validate(), Err(ConfigError::Normalization(4)));
        let bad = Config { zero_run_bytes: 5000, ..Config::default() };
        assert_eq!(bad.validate(), Err(ConfigError::ZeroRun(5000)));
        let bad = Config { fanout_bits: 0, ..Config::default() };
        assert_eq!(bad.validate(), Err(ConfigError::Fanout(0)));
    }
}
