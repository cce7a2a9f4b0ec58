//! Integration tests: one binary, a module per topic. Each test runs the real `mycel`
//! binary against real data directories.

#![allow(clippy::disallowed_methods)] // tests measure wall time and spawn processes

mod cli;
mod cluster;
mod configs;
mod interop;
mod mesh;
mod pins;
mod topology;
