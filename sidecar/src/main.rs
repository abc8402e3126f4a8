//! `agentvm-sidecar`: the in-pod tool-call proxy (`proxy`), the exec server (`exec`), the exec
//! dispatcher (`dispatch`) and the startup probe of the servers (`probe`).

use std::process::ExitCode;

use clap::Parser;

mod cli;

fn main() -> ExitCode {
    let args = cli::Cli::parse();
    if let Err(e) = args.log.init() {
        eprintln!("agentvm-sidecar: {e}");
        return ExitCode::from(cli::EXIT_CONFIG);
    }
    cli::run(args)
}
