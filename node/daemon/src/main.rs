//! The `mycel` binary.

fn main() -> std::process::ExitCode {
    mycel_node::cli::main()
}
