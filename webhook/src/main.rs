//! `agentvm`: the admission webhook (`serve`), the offline review (`review`) and the Rego test
//! runner (`policy test`).

use std::process::ExitCode;

use clap::Parser;

mod cli;

/// Reviews are allocation-heavy (JSON trees in, Rego values, JSON trees out); mimalloc halves
/// the time the system allocator spends on them (see `cargo bench -p agentvm-webhook`).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let args = cli::Cli::parse();
    if let Err(e) = args.log.init() {
        eprintln!("agentvm: {e}");
        return ExitCode::from(cli::EXIT_CONFIG);
    }
    agentvm_common::tls::install_default_provider();
    cli::run(args)
}
