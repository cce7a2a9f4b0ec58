//! FastCDC 2020 cut points over a stream the driver reads in buffers.
//!
//! The driver keeps a buffer of not-yet-cut bytes and asks [`Cutter::cut`] for the length
//! of the next chunk. A cut is only decided once the buffer holds a whole maximum-size
//! window or the stream has ended, so the cut points are those of the whole stream,
//! whatever the buffer sizes were.

use fastcdc::v2020 as cdc2020;

use crate::Config;

/// Finds chunk boundaries for one chunker identity.
#[derive(Clone, Debug)]
pub struct Cutter {
    min: usize,
    avg: usize,
    max: usize,
    mask_s: u64,
    mask_l: u64,
}

impl Cutter {
    /// A cutter for a validated identity.
    ///
    /// # Panics
    /// If `config` does not validate: identities are checked where they enter.
    pub fn new(config: &Config) -> Cutter {
        config.validate().expect("chunker config validated by the caller");
        let level = match config.normalization {
            0 => cdc2020::Normalization::Level0,
            1 => cdc2020::Normalization::Level1,
            2 => cdc2020::Normalization::Level2,
            _ => cdc2020::Normalization::Level3,
        };
        let (mask_s, mask_l) = cdc2020::select_masks(config.chunk_bytes_avg as usize, level);
        Cutter {
            min: config.chunk_bytes_min as usize,
            avg: config.chunk_bytes_avg as usize,
            max: config.chunk_bytes_max as usize,
            mask_s,
            mask_l,
        }
    }

    /// The largest chunk this cutter makes.
    pub fn chunk_bytes_max(&self) -> usize {
        self.max
    }

    /// Length of the next chunk at the start of `pending`, or `None` when more bytes are
    /// needed to decide. `end` says the stream ends after `pending`.
    pub fn cut(&self, pending: &[u8], end: bool) -> Option<usize> {
        if pending.is_empty() {
            return None;
        }
        if pending.len() < self.max && !end {
            return None;
        }
        let (_, len) = cdc2020::cut(
            pending,
            self.min,
            self.avg,
            self.max,
            self.mask_s,
            self.mask_l,
            self.mask_s << 1,
            self.mask_l << 1,
        );
        assert!(len > 0 && len <= pending.len(), "len={len} pending={}", pending.len());
        assert!(len <= self.max, "len={len} max={}", self.max);
        Some(len)
    }

    /// Every chunk length of a whole in-memory stream.
    pub fn lengths(&self, data: &[u8]) -> Vec<usize> {
        let mut out = Vec::new();
        let mut at = 0;
        while let Some(len) = self.cut(&data[at..], true) {
            out.push(len);
            at += len;
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rand::{RngCore, SeedableRng};
    use rand_chacha::ChaCha20Rng;

    fn random(seed: u64, len: usize) -> Vec<u8> {
        let mut data = vec![0u8; len];
        ChaCha20Rng::seed_from_u64(seed).fill_bytes(&mut data);
        data
    }

    #[test]
    fn golden_cut_points() {
        // Pins the cut points of 2 MiB of ChaCha20(seed 7) under the default identity: if
        // this changes, every stored manifest stops deduplicating against new adds.
        let data = random(7, 2 << 20);
        let lengths = Cutter::new(&Config::default()).lengths(&data);
        let mut ends = Vec::new();
        let mut at = 0;
        for len in &lengths {
            at += len;
            ends.push(at);
        }
        assert_eq!(ends, GOLDEN_ENDS.to_vec(), "cut points moved: {ends:?}");
    }

    // Filled from a run of this exact code; see golden_cut_points.
    const GOLDEN_ENDS: &[usize] = &[
        148270, 218378, 248973, 319698, 388080, 509355, 645267, 716067, 821794, 850285, 900714,
        1027844, 1071133, 1147485, 1271017, 1358398, 1456735, 1604178, 1678313, 1772592, 1850594,
        2063423, 2097152,
    ];

    #[test]
    fn buffering_does_not_move_cut_points() {
        // Feeding the stream in odd-sized buffers gives the same cuts as the whole stream.
        let data = random(3, 3 << 20);
        let cutter = Cutter::new(&Config::default());
        let whole = cutter.lengths(&data);
        let mut pending: Vec<u8> = Vec::new();
        let mut got = Vec::new();
        for piece in data.chunks(100_003) {
            pending.extend_from_slice(piece);
            while let Some(len) = cutter.cut(&pending, false) {
                got.push(len);
                pending.drain(..len);
            }
        }
        while let Some(len) = cutter.cut(&pending, true) {
            got.push(len);
            pending.drain(..len);
        }
        assert_eq!(got, whole);
    }

    proptest! {
        #![proptest_config(ProptestConfig {
            cases: 64,
            rng_algorithm: proptest::test_runner::RngAlgorithm::ChaCha,
            ..ProptestConfig::default()
        })]
        #[test]
        fn chunks_concatenate_and_respect_bounds(seed in any::<u64>(), len in 0usize..2_000_000) {
            // Chunk lengths sum to the input and each is within min..=max except the last.
            let data = random(seed, len);
            let config = Config::default();
            let lengths = Cutter::new(&config).lengths(&data);
            prop_assert_eq!(lengths.iter().sum::<usize>(), len);
            for (i, l) in lengths.iter().enumerate() {
                prop_assert!(*l <= config.chunk_bytes_max as usize);
                if i + 1 < lengths.len() {
                    prop_assert!(*l >= config.chunk_bytes_min as usize);
                }
            }
        }
    }

    #[test]
    fn small_edits_touch_few_chunks() {
        // 1,000 insertions of 1-64 bytes into 16 MiB: on average at most 3 chunks are new,
        // and chunks far (> 1 MiB) from the edit are unchanged in at least 99% of cases.
        // Random content has no repeats, so a chunk is unchanged exactly when its position,
        // mapped back across the insertion, and its length are those of an old chunk.
        let base = random(11, 16 << 20);
        let cutter = Cutter::new(&Config::default());
        let spans = |data: &[u8]| -> Vec<(usize, usize)> {
            let mut at = 0;
            cutter
                .lengths(data)
                .into_iter()
                .map(|len| {
                    at += len;
                    (at - len, len)
                })
                .collect()
        };
        let before = spans(&base);
        let old: std::collections::BTreeSet<(usize, usize)> = before.iter().copied().collect();
        let mut rng = ChaCha20Rng::seed_from_u64(12);
        let (mut new_total, mut far_total, mut far_kept) = (0usize, 0usize, 0usize);
        let trials = 1000;
        for _ in 0..trials {
            let at = (rng.next_u64() % base.len() as u64) as usize;
            let n = 1 + (rng.next_u32() % 64) as usize;
            let mut edited = Vec::with_capacity(base.len() + n);
            edited.extend_from_slice(&base[..at]);
            let mut insert = vec![0u8; n];
            rng.fill_bytes(&mut insert);
            edited.extend_from_slice(&insert);
            edited.extend_from_slice(&base[at..]);
            // After-chunks mapped to old coordinates; None if they contain inserted bytes.
            let after = spans(&edited);
            let after_count = after.len();
            let mapped: std::collections::BTreeSet<(usize, usize)> = after
                .into_iter()
                .filter_map(|(s, l)| {
                    if s + l <= at {
                        Some((s, l))
                    } else if s >= at + n {
                        Some((s - n, l))
                    } else {
                        None
                    }
                })
                .collect();
            new_total += after_count - mapped.intersection(&old).count();
            for span in &before {
                if span.0.abs_diff(at) > (1 << 20) {
                    far_total += 1;
                    if mapped.contains(span) {
                        far_kept += 1;
                    }
                }
            }
        }
        let mean_new = new_total as f64 / trials as f64;
        assert!(mean_new <= 3.0, "mean new chunks per edit {mean_new}");
        let kept = far_kept as f64 / far_total as f64;
        assert!(kept >= 0.99, "far chunks kept {kept}");
    }
}
