//! The `tidemark` command: parses arguments, sets up logging, dispatches to one
//! module per subcommand (`src/cli/`).

#![deny(unsafe_code)]

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod cli;

/// Continuous, crash-consistent block replication for Linux.
#[derive(Parser)]
#[command(name = "tidemark", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create a CA, certificates for relay, target and agent, a data key per
    /// group, and one TOML config per role.
    Init(cli::init::InitArgs),
    /// Run the relay (process server): spool frames durably and forward them.
    Relay(cli::relay::RelayArgs),
    /// Run the target (master target): apply frames to the replica images.
    Target(cli::target::TargetArgs),
    /// Run the agent: capture, seal and push the protected disks' writes.
    Agent(cli::agent::AgentArgs),
    /// Run relay, target and agent on this machine and measure the pipeline.
    Bench(cli::bench::BenchArgs),
    /// Show a role's status (from the config file it runs with).
    Status(cli::status::StatusArgs),
    /// Resync a disk of the running agent by checksum (only differing blocks
    /// travel), or in full.
    Resync(cli::resync::ResyncArgs),
    /// Compare a disk of the running agent with its replica, without sending
    /// data; non-zero exit when they differ.
    Verify(cli::resync::VerifyArgs),
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Init(a) => cli::init::run(a),
        Command::Relay(a) => cli::relay::run(a),
        Command::Target(a) => cli::target::run(a),
        Command::Agent(a) => cli::agent::run(a),
        Command::Bench(a) => cli::bench::run(a),
        Command::Status(a) => cli::status::run(a),
        Command::Resync(a) => cli::resync::run_resync(a),
        Command::Verify(a) => cli::resync::run_verify(a),
    }
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tidemark: {e:#}");
            ExitCode::FAILURE
        }
    }
}
