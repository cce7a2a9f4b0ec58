//! mycel
mod codec;
mod store;
fn main() {}
