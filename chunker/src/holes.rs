//! Disk-image holes: which parts of an image are data and which are holes.
//!
//! A hole is any run of whole, 4 KiB-aligned, all-zero blocks at least
//! [`Config::zero_run_bytes`](crate::Config) long, whatever the filesystem reports. The
//! driver may know some ranges are zero without reading them (SEEK_HOLE), and says so with
//! [`Segmenter::zeros`]; that only saves reads and never changes the result, so one image
//! stored fully allocated, sparse, or read from a block device has one root CID.

use std::ops::Range;

use crate::HOLE_ALIGN_BYTES;

const BLOCK: usize = HOLE_ALIGN_BYTES as usize;

/// One piece of the image, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Piece {
    /// Data bytes: this range of the buffer given to [`Segmenter::data`].
    Data(Range<usize>),
    /// Zero bytes that are data (a zero run too short, or too unaligned, to be a hole).
    Zeros(u64),
    /// A hole of this many bytes: never stored, never sent.
    Hole(u64),
}

/// Classifies an image, fed in order from offset 0, into [`Piece`]s.
#[derive(Clone, Debug)]
pub struct Segmenter {
    zero_run_bytes: u64,
    offset: u64,
    pending_zero_bytes: u64,
    ended: bool,
}

impl Segmenter {
    /// A segmenter with this hole threshold (a positive multiple of 4 KiB).
    ///
    /// # Panics
    /// If the threshold is not a positive multiple of 4 KiB (validated with the config).
    pub fn new(zero_run_bytes: u64) -> Segmenter {
        assert!(zero_run_bytes > 0 && zero_run_bytes.is_multiple_of(HOLE_ALIGN_BYTES));
        Segmenter { zero_run_bytes, offset: 0, pending_zero_bytes: 0, ended: false }
    }

    /// Image bytes consumed so far.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Bytes read from the image at [`Self::offset`]. Every call but the last must pass a
    /// multiple of 4 KiB, so blocks stay aligned; the pieces refer to ranges of `buf`.
    ///
    /// # Panics
    /// If called after a call whose length was not a multiple of 4 KiB.
    pub fn data(&mut self, buf: &[u8], out: &mut Vec<Piece>) {
        assert!(!self.ended, "data after the unaligned tail at offset {}", self.offset);
        let mut open: Option<usize> = None;
        for (i, block) in buf.chunks(BLOCK).enumerate() {
            let at = i * BLOCK;
            if block.len() == BLOCK && is_zero(block) {
                if let Some(start) = open.take() {
                    out.push(Piece::Data(start..at));
                }
                self.pending_zero_bytes += BLOCK as u64;
            } else {
                if block.len() < BLOCK {
                    self.ended = true;
                }
                self.flush(out);
                open.get_or_insert(at);
            }
        }
        if let Some(start) = open {
            out.push(Piece::Data(start..buf.len()));
        }
        self.offset += buf.len() as u64;
    }

    /// `len` bytes at [`Self::offset`] known to be zero without reading them.
    ///
    /// # Panics
    /// If the range is not whole 4 KiB blocks, or follows the unaligned tail.
    pub fn zeros(&mut self, len: u64) {
        assert!(!self.ended, "zeros after the unaligned tail at offset {}", self.offset);
        assert!(len.is_multiple_of(HOLE_ALIGN_BYTES), "unaligned zero range len={len}");
        self.pending_zero_bytes += len;
        self.offset += len;
    }

    /// The end of the image: emits what is still pending.
    pub fn finish(&mut self, out: &mut Vec<Piece>) {
        self.flush(out);
        self.ended = true;
    }

    fn flush(&mut self, out: &mut Vec<Piece>) {
        let len = std::mem::take(&mut self.pending_zero_bytes);
        if len == 0 {
            return;
        }
        if len >= self.zero_run_bytes {
            out.push(Piece::Hole(len));
        } else {
            out.push(Piece::Zeros(len));
        }
    }
}

/// Whether a block is all zero; returns at the first non-zero word.
pub fn is_zero(block: &[u8]) -> bool {
    let mut words = block.chunks_exact(16);
    let words_zero =
        words.by_ref().all(|w| u128::from_ne_bytes(w.try_into().expect("16-byte chunk")) == 0);
    words_zero && words.remainder().iter().all(|&b| b == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pieces_of(image: &[u8], feed: usize) -> Vec<(char, u64)> {
        let mut seg = Segmenter::new(64 * 1024);
        let mut out = Vec::new();
        let mut flat = Vec::new();
        for part in image.chunks(feed) {
            seg.data(part, &mut out);
            for p in out.drain(..) {
                flat.push(match p {
                    Piece::Data(r) => ('d', r.len() as u64),
                    Piece::Zeros(n) => ('z', n),
                    Piece::Hole(n) => ('h', n),
                });
            }
        }
        seg.finish(&mut out);
        for p in out.drain(..) {
            flat.push(match p {
                Piece::Data(r) => ('d', r.len() as u64),
                Piece::Zeros(n) => ('z', n),
                Piece::Hole(n) => ('h', n),
            });
        }
        // Merge adjacent data pieces, which differ only by how the image was fed.
        let mut merged: Vec<(char, u64)> = Vec::new();
        for (k, n) in flat {
            match merged.last_mut() {
                Some((lk, ln)) if *lk == k && k != 'h' => *ln += n,
                Some((lk, ln)) if *lk == 'h' && k == 'h' => *ln += n,
                _ => merged.push((k, n)),
            }
        }
        merged
    }

    #[test]
    fn holes_are_aligned_zero_runs_over_the_threshold() {
        // A 64 KiB aligned zero run is a hole; a 60 KiB one is data; an unaligned run only
        // counts from its first aligned block; a zero tail shorter than a block is data.
        let mut image = vec![1u8; 4096];
        image.extend(vec![0u8; 64 * 1024]); // hole
        image.extend(vec![2u8; 4096]);
        image.extend(vec![0u8; 60 * 1024]); // too short
        image.extend(vec![3u8; 4096 + 100]);
        image.extend(vec![0u8; 4096 - 100 + 64 * 1024]); // aligned part is 64 KiB: a hole
        image.extend(vec![0u8; 10]); // unaligned tail: data
        let got = pieces_of(&image, 1 << 20);
        assert_eq!(
            got,
            vec![
                ('d', 4096),
                ('h', 65536),
                ('d', 4096),
                ('z', 61440),
                ('d', 8192),
                ('h', 65536),
                ('d', 10)
            ]
        );
        // The answer does not depend on how the image was fed.
        assert_eq!(pieces_of(&image, 8192), got);
    }

    #[test]
    fn known_zero_ranges_equal_read_zeros() {
        // Declaring a range zero (as SEEK_HOLE lets the driver do) gives the pieces that
        // reading the zeros gives.
        let mut by_read = Segmenter::new(64 * 1024);
        let mut by_seek = Segmenter::new(64 * 1024);
        let (mut a, mut b) = (Vec::new(), Vec::new());
        let data = vec![9u8; 8192];
        by_read.data(&data, &mut a);
        by_seek.data(&data, &mut b);
        by_read.data(&vec![0u8; 128 * 1024], &mut a);
        by_seek.zeros(128 * 1024);
        by_read.data(&data, &mut a);
        by_seek.data(&data, &mut b);
        by_read.finish(&mut a);
        by_seek.finish(&mut b);
        assert_eq!(a, b);
        assert_eq!(a[1], Piece::Hole(128 * 1024));
    }

    #[test]
    fn is_zero_finds_any_set_byte() {
        // Every position of a set byte, including the unaligned remainder, is seen.
        for i in 0..40 {
            let mut block = vec![0u8; 40];
            assert!(is_zero(&block));
            block[i] = 1;
            assert!(!is_zero(&block), "i={i}");
        }
    }
}
