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
    /// Cache nodes (`http://host:port,…`, or one name that resolves to several): the agent
    /// learns the cluster's members from the first that answers and asks each model's
    /// owner first.
    #[arg(long, env = "CACHE_AGENT_NODE", value_delimiter = ',', default_value = crate::node::DEFAULT_NODE)]
    pub node: Vec<String>,

    /// Use the first `--node` as given (the others in order if it is down), without
    /// asking who owns the model: for a node next to the host, and for tests of peer fill.
    #[arg(long, env = "CACHE_AGENT_DIRECT")]
    pub direct: bool,

    /// How long a node may send nothing in the middle of a stream before the agent goes
    /// on with the next node (e.g. `60s`; a node cut off without a reset is noticed so).
    #[arg(long, env = "CACHE_AGENT_IDLE_TIMEOUT", default_value = "60s", value_parser = parse_duration)]
    pub idle_timeout: std::time::Duration,

    /// Where models are kept (default: the platform cache dir, e.g. ~/.cache/modelcache).
    #[arg(long, env = "CACHE_AGENT_DIR")]
    pub dir: Option<PathBuf>,

    /// Never ask a node: `get` and `prefetch` return local copies (sizes checked); without
    /// it they do so only when no node answers, saying so on stderr.
    #[arg(long, env = "CACHE_AGENT_OFFLINE")]
    pub offline: bool,

    /// A file holding the bearer token to present to the nodes (one line); without it,
    /// the `CACHE_AGENT_TOKEN` variable. Never a plain flag, which `ps` would show.
    #[arg(long, env = "CACHE_AGENT_TOKEN_FILE", global = true)]
    pub token_file: Option<PathBuf>,

    /// The CA (PEM) that `https://` nodes' certificates must chain to; without it, the
    /// system's CA bundle. Read again when it changes.
    #[arg(long, env = "CACHE_AGENT_CA", global = true)]
    pub ca: Option<PathBuf>,

    /// For nodes that require client certificates (mutual TLS): this agent's certificate
    /// (PEM); needs --key.
    #[arg(long, env = "CACHE_AGENT_CERT", global = true, requires = "key")]
    pub cert: Option<PathBuf>,

    /// The private key of --cert (PEM).
    #[arg(long, env = "CACHE_AGENT_KEY", global = true, requires = "cert")]
    pub key: Option<PathBuf>,

    /// Output for scripts: JSON on stdout (`ls`, `stat`, `models`, `nodes`, `prefetch`,
    /// `get`, `admin`).
    #[arg(long, global = true)]
    pub json: bool,

    /// Log more on stderr: `-v` what the agent does, `-vv` debug detail (default:
    /// warnings, or `RUST_LOG` when set).
    #[arg(short, long, action = clap::ArgAction::Count, global = true, conflicts_with = "quiet")]
    pub verbose: u8,

    /// Log errors only, and no progress.
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
    /// List the cluster's members (address, id, health); for a model, in its rank order,
    /// owner first.
    /// With `--json`: one JSON array, each member with `address`, `id`, `healthy` and
    /// `rank`.
    Nodes { reference: Option<String> },
    /// Run the agent daemon: prefetch in the background, answer workers over gRPC
    /// (`modelcache.v1.Agent`), keep DIR within --max-size.
    Daemon(Box<DaemonArgs>),
    /// Operator controls of the nodes (`modelcache.v1.Admin`): one line per node, with
    /// the revision it serves or why the call failed there.
    #[command(subcommand)]
    Admin(AdminCommand),
}

#[derive(Subcommand, Debug)]
pub enum AdminCommand {
    /// Make the first `--node` (every member with `--cluster`) list the model's folder in
    /// the origin again on its next request.
    Invalidate {
        reference: String,
        #[arg(long)]
        cluster: bool,
    },
    /// List the model in the origin now and print the revision each node then serves
    /// (pins of the model move to it).
    Revalidate {
        reference: String,
        #[arg(long)]
        cluster: bool,
    },
    /// Keep a model (or variant) whole on the node's disk, outside the tiers' eviction,
    /// at its newest revision; prints the revision pinned and its size.
    Pin {
        reference: String,
        #[arg(long)]
        cluster: bool,
    },
    /// Stop keeping a pinned model and remove its pinned files.
    Unpin {
        reference: String,
        #[arg(long)]
        cluster: bool,
    },
    /// The models pinned on the node: one line per pin (`ID ADDRESS REFERENCE REVISION
    /// SIZE`).
    Pins {
        #[arg(long)]
        cluster: bool,
    },
}

#[derive(clap::Args, Debug)]
pub struct DaemonArgs {
    /// Where workers reach the daemon: `unix:///PATH` or `HOST:PORT`.
    #[arg(long, env = "CACHE_AGENT_LISTEN", default_value = crate::daemon::DEFAULT_LISTEN)]
    pub listen: String,

    /// Permissions of the unix socket, octal (workers need read and write on it).
    #[arg(long, env = "CACHE_AGENT_SOCKET_MODE", default_value = "660", value_parser = parse_mode)]
    pub socket_mode: u32,

    /// Models fetched in the background at start (`REF,…`).
    #[arg(long, env = "CACHE_AGENT_PREFETCH", value_delimiter = ',')]
    pub prefetch: Vec<String>,

    /// A file of references to fetch in the background, one per line (`#` comments);
    /// re-read on SIGHUP and when it changes.
    #[arg(long, env = "CACHE_AGENT_PREFETCH_FILE")]
    pub prefetch_file: Option<PathBuf>,

    /// Disk budget for DIR (e.g. `50GiB`): least recently used models are evicted beyond
    /// it, never a leased or in-flight one. Unlimited when not given.
    #[arg(long, env = "CACHE_AGENT_MAX_SIZE", value_parser = parse_size)]
    pub max_size: Option<u64>,

    /// Bandwidth for background fetches (e.g. `100MiB/s`); what a worker waits for is
    /// never throttled. Unlimited when not given.
    #[arg(long, env = "CACHE_AGENT_MAX_BANDWIDTH", value_parser = parse_size)]
    pub max_bandwidth: Option<u64>,

    /// How often the prefetch list is fetched again to pick up new revisions (`0` never).
    #[arg(long, env = "CACHE_AGENT_REFRESH_INTERVAL", default_value = "10m", value_parser = parse_duration)]
    pub refresh_interval: std::time::Duration,

    /// Bytes per second the background re-check of local models reads (`0` off).
    #[arg(long, env = "CACHE_AGENT_VERIFY_RATE", default_value = "32MiB", value_parser = parse_size)]
    pub verify_rate: u64,

    /// Serve Prometheus metrics over HTTP on this address (e.g. `127.0.0.1:9091`):
    /// `/metrics`, `/healthz`, `/readyz`. Off unless given
    #[arg(long, env = "CACHE_AGENT_METRICS_LISTEN")]
    pub metrics_listen: Option<std::net::SocketAddr>,

    /// Bearer tokens workers must present, one grant per line, as the node's
    /// `--auth-tokens-file` (docs/security.md); read again when it changes. Off unless
    /// given: then a unix socket's permissions decide who may call.
    #[arg(long, env = "CACHE_AGENT_AUTH_TOKENS_FILE")]
    pub auth_tokens_file: Option<PathBuf>,

    /// Serve TLS on a TCP --listen with this certificate chain (PEM); needs --tls-key.
    /// Read again when it changes.
    #[arg(long, env = "CACHE_AGENT_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// The private key of --tls-cert (PEM).
    #[arg(long, env = "CACHE_AGENT_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// Mutual TLS: workers must present a certificate signed by this CA (PEM).
    #[arg(long, env = "CACHE_AGENT_TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,
}

fn parse_mode(s: &str) -> Result<u32, String> {
    u32::from_str_radix(s.trim_start_matches("0o"), 8)
        .ok()
        .filter(|m| *m <= 0o777)
        .ok_or_else(|| format!("{s:?} is not an octal file mode (e.g. 660)"))
}

/// A size (`50GiB`, `100MB`, `1048576`), or a rate given as a size per second
/// (`100MiB/s`).
fn parse_size(s: &str) -> Result<u64, String> {
    let text = s.trim().trim_end_matches("/s");
    text.parse::<bytesize::ByteSize>()
        .map(|b| b.as_u64())
        .map_err(|e| format!("{s:?}: {e} (e.g. 50GiB, 100MiB/s)"))
}

fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    if s.trim() == "0" {
        return Ok(std::time::Duration::ZERO);
    }
    humantime::parse_duration(s).map_err(|e| format!("{s:?}: {e} (e.g. 60s, 5m)"))
}

impl Cli {
    /// Every environment variable the agent reads.
    pub fn env_vars() -> Vec<String> {
        let command = Self::command();
        let subcommands = command.get_subcommands().flat_map(|c| c.get_arguments());
        command
            .get_arguments()
            .chain(subcommands)
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
