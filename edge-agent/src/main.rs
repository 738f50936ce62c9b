use clap::Parser;

fn main() -> std::process::ExitCode {
    edge_agent::cli::main(edge_agent::cli::Cli::parse())
}
