//! `agentvm-sidecar`: the in-pod tool-call proxy (`proxy`), the exec server (`exec`), the exec
//! dispatcher (`dispatch`) and the startup probe of the servers (`probe`).

use std::process::ExitCode;

use agentvm_sidecar::exec::runner;
use clap::Parser;

mod cli;

fn main() -> ExitCode {
    // The runner of one command reads nothing from its environment (the command's): it is
    // started before the flags, which do, are parsed.
    let mut args = std::env::args_os().skip(1);
    if args.next().is_some_and(|a| a == runner::SUBCOMMAND) {
        return runner::main(args);
    }
    let args = cli::Cli::parse();
    if let Err(e) = args.log.init() {
        eprintln!("agentvm-sidecar: {e}");
        return ExitCode::from(cli::EXIT_CONFIG);
    }
    cli::run(args)
}
