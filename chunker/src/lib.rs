//! mycel's content model, as a sans-IO core.
//!
//! Bytes, files, directories, disk images and topology files become content-addressed
//! chunks and manifests here:
//!
//! - [`Config`] is the chunker identity (FastCDC 2020 sizes, normalisation, zero-run
//!   threshold, index fan-out) recorded in every manifest.
//! - [`cdc`] finds FastCDC cut points in a stream of buffers the driver reads.
//! - [`holes`] classifies a disk image into data and holes (4 KiB-aligned zero runs).
//! - [`Cid`] names every block: raw chunks (0x55) and DAG-CBOR manifest nodes (0x71), both
//!   BLAKE3-256.
//! - [`manifest`] builds and reads the content-cut manifest trees; [`cbor`] is the strict
//!   deterministic DAG-CBOR codec under them.
//! - [`topology`] parses and canonicalises router topology files.
//!
//! Nothing here reads the clock, the filesystem or OS randomness: the node daemon and the
//! simulator drive these types and perform the IO.

pub mod cbor;
pub mod cdc;
mod cid;
pub mod codec;
mod config;
pub mod holes;
pub mod manifest;
pub mod topology;

pub use crate::cid::{Cid, CidError, Codec, cmp_in_words};
pub use crate::config::{Config, ConfigError, HOLE_ALIGN_BYTES, NODE_BYTES_MAX};
