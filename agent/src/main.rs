use std::process::ExitCode;

fn main() -> ExitCode {
    insite_agent::cli::main()
}
