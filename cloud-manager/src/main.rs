use std::process::ExitCode;

use clap::Parser;
use cloud_manager::cli::{Cli, Command};

fn main() -> ExitCode {
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
