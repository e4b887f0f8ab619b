//! `tidemark init`: CA, certificates, data keys and role configs.

use std::path::PathBuf;

/// Create a CA, certificates for relay, target and agent, a data key per
/// group, and one TOML config per role.
#[derive(clap::Args)]
pub struct InitArgs {
    /// Directory to write into (created if missing).
    #[arg(long)]
    dir: PathBuf,
    /// Name of the relay (also the TLS server name clients expect).
    #[arg(long, default_value = "relay")]
    relay_name: String,
    /// Name of the target.
    #[arg(long, default_value = "target")]
    target_name: String,
    /// Name of the agent.
    #[arg(long, default_value = "agent")]
    agent_name: String,
    /// Consistency group (repeat for several); each gets its own data key.
    #[arg(long = "group", default_value = "g1")]
    groups: Vec<String>,
    /// Extra DNS name or IP address for the relay certificate (repeatable).
    #[arg(long = "relay-host")]
    relay_hosts: Vec<String>,
    /// Extra DNS name or IP address for the agent certificate, as NBD clients
    /// reach its TLS frontend (repeatable).
    #[arg(long = "agent-host")]
    agent_hosts: Vec<String>,
    /// Address the relay listens on.
    #[arg(long, default_value = "0.0.0.0:7400")]
    relay_listen: String,
    /// Overwrite existing files.
    #[arg(long)]
    force: bool,
}

/// Run `init`.
pub fn run(a: InitArgs) -> anyhow::Result<()> {
    let mut opts = tidemark::pki::InitOptions::new(&a.dir);
    opts.relay_name = a.relay_name;
    opts.target_name = a.target_name;
    opts.agent_name = a.agent_name;
    opts.groups = a.groups;
    if !a.relay_hosts.is_empty() {
        opts.relay_hosts.extend(a.relay_hosts);
    }
    opts.agent_hosts.extend(a.agent_hosts);
    opts.relay_listen = a.relay_listen;
    opts.force = a.force;
    let report = tidemark::pki::init(&opts)?;
    for f in &report.files {
        println!("wrote {}", f.display());
    }
    Ok(())
}
