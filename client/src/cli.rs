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

    /// Log more on stderr: `-v` what the agent does, `-vv` debug detail (default:
    /// warnings, or `RUST_LOG` when set).
    #[arg(short, long, action = clap::ArgAction::Count, global = true, conflicts_with = "quiet")]
    pub verbose: u8,

    /// Log errors only.
    #[arg(short, long, global = true)]
    pub quiet: bool,

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

impl Cli {
    /// The log filter the flags ask for; `None` leaves it to `RUST_LOG` (else warnings).
    pub fn log_filter(&self) -> Option<&'static str> {
        match (self.quiet, self.verbose) {
            (true, _) => Some("error"),
            (false, 0) => None,
            (false, 1) => Some("info"),
            (false, 2) => Some("debug"),
            (false, _) => Some("trace"),
        }
    }
}
