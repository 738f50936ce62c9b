use std::ffi::OsString;
use std::process::ExitCode;

use clap::Parser;
use cloud_manager::cli::{Cli, Command};

// edgectl is built into this binary too, so that `cargo run -p
// cloud-manager -- dev` gives a working edgectl (`DIR/bin/edgectl` runs
// `cloud-manager edgectl ...`) without building anything else.
#[path = "bin/edgectl.rs"]
mod edgectl;

fn main() -> ExitCode {
    if std::env::args_os().nth(1).is_some_and(|a| a == "edgectl") {
        let args = std::iter::once(OsString::from("edgectl")).chain(std::env::args_os().skip(2));
        return edgectl::main_from(args);
    }
    let cli = Cli::parse();
    if let Command::Agent { command } = cli.command {
        return edge_agent::cli::main(edge_agent::cli::Cli { command });
    }
    match cloud_manager::commands::run(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cloud-manager: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
