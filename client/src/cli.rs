//! The `cache-agent` command line: flags, environment variables and subcommands.

use std::path::PathBuf;

use clap::{CommandFactory, Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "cache-agent",
    version,
    about = "Prefetch models from modelcache nodes into verified local directories"
)]
pub struct Cli {
    /// Cache node addresses, tried in order (`http://host:port,…`).
    #[arg(long, env = "CACHE_AGENT_NODE", value_delimiter = ',', default_value = crate::node::DEFAULT_NODE)]
    pub node: Vec<String>,

    /// Where models are kept (default: the platform cache dir, e.g. ~/.cache/modelcache).
    #[arg(long, env = "CACHE_AGENT_DIR")]
    pub dir: Option<PathBuf>,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Fetch models into DIR, verified; prints each model's local directory.
    Prefetch {
        #[arg(required = true)]
        references: Vec<String>,
    },
    /// Like prefetch of one model, for scripts: prints its directory.
    Get {
        /// Print the path of the model's only weight file instead.
        #[arg(long)]
        weights: bool,
        reference: String,
    },
    /// Re-check local copies against their manifests.
    Verify {
        /// Also re-check each file's SHA-256.
        #[arg(long)]
        sha256: bool,
        reference: Option<String>,
    },
    /// List models present locally.
    Ls,
    /// Show a model's manifest on the node.
    Stat { reference: String },
    /// Remove a local model.
    Rm { reference: String },
    /// List the models the cluster offers.
    Models,
}

impl Cli {
    /// Every environment variable the agent reads.
    pub fn env_vars() -> Vec<String> {
        Self::command()
            .get_arguments()
            .filter_map(|a| a.get_env().map(|e| e.to_string_lossy().into_owned()))
            .collect()
    }
}
