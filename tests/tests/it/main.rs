//! Integration tests: one binary, a module per topic. Each test runs the real `mycel`
//! binary against real data directories.

mod cli;
mod configs;
mod interop;
mod mesh;
