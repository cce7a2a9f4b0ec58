//! mycel-node: the daemon and the `mycel` CLI, the one crate that does IO.
//!
//! The cores decide; this crate reads and writes files, devices and the store on their
//! behalf, and presents the result to people and scripts.
//!
//! # Glossary
//!
//! - **chunk**: a piece of content cut by FastCDC, named by a raw BLAKE3 CID.
//! - **manifest**: the DAG-CBOR blocks that describe an object: its root block and the
//!   index nodes of its content tree.
//! - **root**: the CID of an object's root block; what users add, get and pin.
//! - **block**: a chunk or a manifest node; what the store holds.
//! - **replica**: a copy of an object's data on a node.
//! - **member**: a node admitted to the cluster; a **manager** is a member that votes in
//!   the Raft quorum.
//! - **pin**, **pre-position**: declarations of where content must live (later issues).

// The driver: it reads the clock, spawns the add pipeline, and uses hash maps for store
// bookkeeping whose order never matters.
#![allow(clippy::disallowed_types, clippy::disallowed_methods)]

pub mod api;
pub mod cli;
pub mod cluster;
pub mod daemon;
pub mod datadir;
pub mod ingest;
pub mod live;
pub mod metrics;
pub mod net;
pub mod objects;
pub mod replicate;
pub mod restore;
pub mod store;
pub mod topology;
