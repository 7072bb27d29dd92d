//! Node configuration: flags, `CACHE_NODE_*` environment variables, and `--config FILE`
//! (TOML with the flags' names as keys). Precedence: flag, then environment, then file,
//! then the default.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytesize::ByteSize;
use clap::{CommandFactory, FromArgMatches, Parser, parser::ValueSource};
use modelcache_proto::tls::{ClientTls, Identity, ServerTls};

use crate::checksum::ChecksumPolicy;
use crate::error::{Error, Result};
use crate::origin::S3Options;

#[derive(Parser, Debug, Clone)]
#[command(
    name = "cache-node",
    version,
    about = "modelcache node: caches models from S3-compatible storage and streams them over gRPC"
)]
pub struct Config {
    /// TOML file whose keys are these flags' long names (e.g. `origin = "s3://models"`).
    #[arg(long, env = "CACHE_NODE_CONFIG")]
    pub config: Option<PathBuf>,

    /// gRPC address to listen on.
    #[arg(long, env = "CACHE_NODE_LISTEN", default_value = "127.0.0.1:7070")]
    pub listen: SocketAddr,

    /// Where models come from: `s3://BUCKET[/PREFIX]`, `file:///abs/path` or a directory.
    #[arg(long, env = "CACHE_NODE_ORIGIN", default_value = "./models")]
    pub origin: String,

    /// How long a cached revision is trusted before the model's folder is re-listed.
    #[arg(long, env = "CACHE_NODE_REVALIDATE_AFTER", default_value = "60s", value_parser = parse_duration)]
    pub revalidate_after: Duration,

    /// Disk tier location.
    #[arg(long, env = "CACHE_NODE_CACHE_DIR", default_value = "./cache-data")]
    pub cache_dir: PathBuf,

    /// Memory tier size (e.g. `1GiB`, `256MiB`).
    #[arg(long, env = "CACHE_NODE_MEMORY_CAPACITY", default_value = "1GiB")]
    pub memory_capacity: ByteSize,

    /// Disk tier size (at least 61 MiB).
    #[arg(long, env = "CACHE_NODE_DISK_CAPACITY", default_value = "20GiB")]
    pub disk_capacity: ByteSize,

    /// Chunks a transfer reads ahead of its client (through the tiers; a miss joins or
    /// starts a large origin read).
    #[arg(long, env = "CACHE_NODE_ORIGIN_PARALLELISM", default_value_t = 16)]
    pub origin_parallelism: usize,

    /// Longest ranged GET to an S3 origin: missing chunks of a file are read in runs of up
    /// to this many bytes per request, cut into 2 MiB chunks as they arrive (rounded down
    /// to whole chunks; `2MiB` reads chunk by chunk).
    #[arg(long, env = "CACHE_NODE_ORIGIN_PART_SIZE", default_value = "16MiB")]
    pub origin_part_size: ByteSize,

    /// Parts of a file read from the origin ahead of the part a transfer that reads it
    /// cold is in (while the room for chunks on their way to disk is half free).
    #[arg(long, env = "CACHE_NODE_ORIGIN_PARTS_AHEAD", default_value_t = 3)]
    pub origin_parts_ahead: u64,

    /// Bytes per second read from the origin by the whole node, at most (e.g. `200MiB`;
    /// off unless given): for origins that bill or throttle bandwidth.
    #[arg(long, env = "CACHE_NODE_ORIGIN_MAX_BANDWIDTH")]
    pub origin_max_bandwidth: Option<ByteSize>,

    /// Origin GETs in flight on the whole node, at most (for origins that bill or throttle
    /// per request).
    #[arg(long, env = "CACHE_NODE_ORIGIN_MAX_REQUESTS", default_value_t = 64)]
    pub origin_max_requests: usize,

    /// Compare each file read from the origin with the checksum the origin publishes:
    /// `all` (S3's full-object checksums, else the MD5 ETag of a single-part upload),
    /// `checksums` (the full-object checksums only: the MD5 pass costs ~1.5 CPU-s per
    /// GiB), or `off`.
    #[arg(
        long,
        env = "CACHE_NODE_ORIGIN_CHECKSUMS",
        value_enum,
        default_value = "all"
    )]
    pub origin_checksums: ChecksumPolicy,

    /// Variants built ahead of time, as soon as an original is read in full (comma-separated,
    /// e.g. `int8,fp16`; `none` builds variants only when asked for).
    #[arg(long, env = "CACHE_NODE_PRECOMPUTE", default_value = "int8,fp16", value_parser = parse_variants)]
    pub precompute: VariantList,

    /// Disk space for built variants (at least 61 MiB). Variants have a tier of their own,
    /// so they are evicted among themselves and never push out the originals they are
    /// rebuilt from.
    #[arg(long, env = "CACHE_NODE_VARIANT_CAPACITY", default_value = "4GiB")]
    pub variant_capacity: ByteSize,

    /// Variant builds that run at once (each uses one core while it quantizes).
    #[arg(long, env = "CACHE_NODE_BUILD_PARALLELISM", default_value_t = 1)]
    pub build_parallelism: usize,

    /// S3 endpoint (else `AWS_ENDPOINT_URL`), e.g. `http://127.0.0.1:9000` for MinIO.
    #[arg(long, env = "CACHE_NODE_S3_ENDPOINT")]
    pub s3_endpoint: Option<String>,

    /// S3 access key id (else `AWS_ACCESS_KEY_ID`).
    #[arg(long, env = "CACHE_NODE_S3_ACCESS_KEY_ID")]
    pub s3_access_key_id: Option<String>,

    /// S3 secret access key (else `AWS_SECRET_ACCESS_KEY`).
    #[arg(long, env = "CACHE_NODE_S3_SECRET_ACCESS_KEY", hide_env_values = true)]
    pub s3_secret_access_key: Option<String>,

    /// S3 region (else `AWS_REGION`).
    #[arg(long, env = "CACHE_NODE_S3_REGION")]
    pub s3_region: Option<String>,

    /// Allow plain-HTTP S3 endpoints (else `AWS_ALLOW_HTTP`).
    #[arg(long, env = "CACHE_NODE_S3_ALLOW_HTTP")]
    pub s3_allow_http: Option<bool>,

    /// Connections served at once; beyond it, new ones wait until one closes.
    #[arg(long, env = "CACHE_NODE_MAX_CONNECTIONS", default_value_t = 4096)]
    pub max_connections: usize,

    /// Streams (RPCs) open at once on one connection. The node announces it to clients in
    /// its HTTP/2 settings, so theirs wait for a free stream; HTTP/2 refuses streams
    /// beyond it (REFUSED_STREAM) from clients that ignore the setting.
    #[arg(
        long,
        env = "CACHE_NODE_MAX_STREAMS_PER_CONNECTION",
        default_value_t = 1024
    )]
    pub max_streams_per_connection: u32,

    /// How long a new connection may take to send its first bytes (the HTTP/2 preface)
    /// before it is closed.
    #[arg(long, env = "CACHE_NODE_HANDSHAKE_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub handshake_timeout: Duration,

    /// Once the node serves, write the address it listens on (`IP:PORT`, one line) to this
    /// file, replacing it atomically: how scripts find a node started with `--listen
    /// 127.0.0.1:0`, and know that it is ready.
    #[arg(long, env = "CACHE_NODE_READY_FILE")]
    pub ready_file: Option<PathBuf>,

    /// The cluster's nodes: `host:port,…`, or a DNS name that resolves to several
    /// addresses (a compose service, a Kubernetes headless service), resolved again every
    /// probe round. May include this node (recognised by its id), so every node can be
    /// given the same list. None: this node runs alone.
    #[arg(long, env = "CACHE_NODE_PEERS", value_delimiter = ',')]
    pub peers: Vec<String>,

    /// The address other nodes and agents reach this node at (`host:port`); default: the
    /// listen address (with the host name when listening on every interface).
    #[arg(long, env = "CACHE_NODE_ADVERTISE")]
    pub advertise: Option<String>,

    /// Stable id models are ranked by; default: generated once and kept in
    /// `CACHE_DIR/node-id`.
    #[arg(long, env = "CACHE_NODE_NODE_ID")]
    pub node_id: Option<String>,

    /// Time between health probes of each peer (a failing one is probed with backoff).
    #[arg(long, env = "CACHE_NODE_PROBE_INTERVAL", default_value = "2s", value_parser = parse_duration)]
    pub probe_interval: Duration,

    /// Longest a probe, a resolve or a chunk asked of a peer may take before the peer is
    /// given up on (and the next in rank asked); a variant asked of its owner waits for
    /// the build, and a dead owner is noticed by keep-alive pings at this interval.
    #[arg(long, env = "CACHE_NODE_PEER_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub peer_timeout: Duration,

    /// After SIGTERM or SIGINT, how long open streams may go on before they are ended with
    /// UNAVAILABLE (agents resume on another node, or on their next run).
    #[arg(long, env = "CACHE_NODE_SHUTDOWN_GRACE", default_value = "30s", value_parser = parse_duration)]
    pub shutdown_grace: Duration,

    /// Bearer tokens callers must present, one grant per line:
    /// `[name:]token[:actions[:prefixes]]` (docs/security.md); read again when the file
    /// changes. Off unless given (every caller admitted); health checks stay open.
    #[arg(long, env = "CACHE_NODE_AUTH_TOKENS_FILE")]
    pub auth_tokens_file: Option<PathBuf>,

    /// A file holding the token this node presents to its peers (each peer's tokens file
    /// must grant it); read at start.
    #[arg(long, env = "CACHE_NODE_PEER_TOKEN_FILE")]
    pub peer_token_file: Option<PathBuf>,

    /// Serve TLS with this certificate chain (PEM); needs --tls-key. Also the client
    /// certificate this node presents to its peers. Read again when it changes.
    #[arg(long, env = "CACHE_NODE_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// The private key of --tls-cert (PEM). Read again when it changes.
    #[arg(long, env = "CACHE_NODE_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// Mutual TLS: every client must present a certificate signed by this CA (PEM); peers'
    /// certificates are checked against it too. Needs --tls-cert. Read again when it
    /// changes.
    #[arg(long, env = "CACHE_NODE_TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,

    /// `Fetch` streams each client (the name of its token) may have open at once; one more
    /// is refused with RESOURCE_EXHAUSTED. Needs --auth-tokens-file. Off unless given.
    #[arg(long, env = "CACHE_NODE_CLIENT_MAX_STREAMS")]
    pub client_max_streams: Option<usize>,

    /// Bytes per second each client (the name of its token) is sent at most, all its
    /// calls together (e.g. `200MiB`). Needs --auth-tokens-file. Off unless given.
    #[arg(long, env = "CACHE_NODE_CLIENT_MAX_BANDWIDTH")]
    pub client_max_bandwidth: Option<ByteSize>,

    /// Print the effective configuration (every key, its value and where it came from:
    /// flag, environment, config file or default; secrets masked) and exit.
    #[arg(long, env = "CACHE_NODE_PRINT_CONFIG")]
    pub print_config: bool,

    /// Serve Prometheus metrics (`/metrics`), `/healthz` and `/readyz` over HTTP on this
    /// address, e.g. `127.0.0.1:9090`; off unless given.
    #[arg(long, env = "CACHE_NODE_METRICS_LISTEN")]
    pub metrics_listen: Option<std::net::SocketAddr>,

    /// Log filter, `RUST_LOG` syntax (e.g. `info`, `warn,cache_node=debug`); when not
    /// given: `RUST_LOG`, else the config file's `log`, else `info`.
    #[arg(long, env = "CACHE_NODE_LOG", value_parser = parse_log_filter)]
    pub log: Option<String>,

    /// Log lines for people (`text`) or one JSON object per line (`json`).
    #[arg(
        long,
        env = "CACHE_NODE_LOG_FORMAT",
        value_enum,
        default_value = "text"
    )]
    pub log_format: LogFormat,
}

/// One setting as `--print-config` shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Setting {
    /// The flag's name, as the config file takes it.
    pub key: String,
    /// Its effective value (lists comma-separated); `None` when not set.
    pub value: Option<String>,
    /// `flag`, `env NAME`, `file PATH`, `default` or `not set`.
    pub source: String,
}

/// The parse in layers: flags and environment alone, then with the config file.
struct Layers {
    first: clap::ArgMatches,
    matches: clap::ArgMatches,
    file: Option<PathBuf>,
    /// Keys the file set.
    from_file: Vec<String>,
}

/// A list of variants, as given to `--precompute`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VariantList(pub Vec<modelcache_quant::Variant>);

fn parse_variants(s: &str) -> Result<VariantList, String> {
    if s.trim().is_empty() || s.trim() == "none" {
        return Ok(VariantList::default());
    }
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim) {
        let v = modelcache_quant::Variant::parse(part).ok_or_else(|| {
            format!("unknown variant {part:?}; known: fp16, bf16, int8, int4, q8_0, q4_0, or none")
        })?;
        if !out.contains(&v) {
            out.push(v);
        }
    }
    Ok(VariantList(out))
}

/// How log lines are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Checks a log filter (`modelcache_telemetry::parse_filter`).
pub fn parse_log_filter(s: &str) -> Result<String, String> {
    modelcache_telemetry::parse_filter(s)
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{s:?}: {e} (e.g. 60s, 5m)"))
}

impl Config {
    /// Parses flags and environment (through clap) and then `--config FILE`.
    pub fn from_args<I, T>(args: I) -> Result<Self>
    where
        I: IntoIterator<Item = T>,
        T: Into<OsString> + Clone,
    {
        let args: Vec<OsString> = args.into_iter().map(Into::into).collect();
        let layers = Self::layers(&args)?;
        Self::from_arg_matches(&layers.matches).map_err(|e| Error::Config(e.to_string()))
    }

    /// Every setting with its effective value and where it came from, for
    /// `--print-config` (secrets masked).
    pub fn describe<I, T>(args: I) -> Result<Vec<Setting>>
    where
        I: IntoIterator<Item = T>,
        T: Into<OsString> + Clone,
    {
        let args: Vec<OsString> = args.into_iter().map(Into::into).collect();
        let layers = Self::layers(&args)?;
        let command = Self::command();
        let mut settings = Vec::new();
        for arg in command.get_arguments() {
            let id = arg.get_id().as_str();
            if matches!(id, "help" | "version" | "print_config") {
                continue;
            }
            let value = layers.matches.get_raw(id).map(|values| {
                values
                    .map(|v| v.to_string_lossy().into_owned())
                    .collect::<Vec<_>>()
                    .join(",")
            });
            let value = match value {
                Some(_) if id.contains("secret") => Some("(set, not shown)".to_owned()),
                other => other,
            };
            let source = if layers.from_file.iter().any(|k| k == id) {
                format!(
                    "file {}",
                    layers
                        .file
                        .as_deref()
                        .map(|f| f.display().to_string())
                        .unwrap_or_default()
                )
            } else {
                match layers.first.value_source(id) {
                    Some(ValueSource::CommandLine) => "flag".to_owned(),
                    Some(ValueSource::EnvVariable) => arg.get_env().map_or_else(
                        || "env".to_owned(),
                        |e| format!("env {}", e.to_string_lossy()),
                    ),
                    Some(ValueSource::DefaultValue) => "default".to_owned(),
                    _ => "not set".to_owned(),
                }
            };
            settings.push(Setting {
                key: id.replace('_', "-"),
                value,
                source,
            });
        }
        Ok(settings)
    }

    /// Flags and environment, then the config file's keys for what those left at their
    /// defaults.
    fn layers(args: &[OsString]) -> Result<Layers> {
        let matches = Self::command()
            .try_get_matches_from(args)
            .map_err(|e| Error::Cli(Box::new(e)))?;
        let first = Self::from_arg_matches(&matches).map_err(|e| Error::Config(e.to_string()))?;
        let Some(file) = first.config.clone() else {
            return Ok(Layers {
                first: matches.clone(),
                matches,
                file: None,
                from_file: Vec::new(),
            });
        };
        let file = &file;
        let text = std::fs::read_to_string(file)
            .map_err(|e| Error::io(format!("reading config {}", file.display()), e))?;
        let table: toml::Table = text
            .parse()
            .map_err(|e| Error::Config(format!("{}: {e}", file.display())))?;
        let mut extended = args.to_vec();
        let mut from_file = Vec::new();
        for (key, value) in table {
            let id = key.replace('-', "_");
            // RUST_LOG, when set, comes before the file's `log`.
            if id == "log" && std::env::var_os("RUST_LOG").is_some() {
                continue;
            }
            if Self::command()
                .get_arguments()
                .all(|a| a.get_id() != id.as_str())
                || id == "config"
            {
                return Err(Error::Config(format!(
                    "{}: unknown key {key:?}",
                    file.display()
                )));
            }
            if matches.value_source(&id) != Some(ValueSource::DefaultValue)
                && matches.value_source(&id).is_some()
            {
                continue;
            }
            let value = match value {
                toml::Value::String(s) => s,
                // A list (`precompute = ["int8", "fp16"]`, `peers = [...]`): the comma
                // form the flag takes; an empty one is `none` for `precompute`.
                toml::Value::Array(items) if items.is_empty() && id == "precompute" => {
                    "none".to_owned()
                }
                toml::Value::Array(items) => items
                    .iter()
                    .map(|v| v.as_str().map_or_else(|| v.to_string(), str::to_owned))
                    .collect::<Vec<_>>()
                    .join(","),
                other => other.to_string(),
            };
            extended.push(format!("--{}={value}", id.replace('_', "-")).into());
            from_file.push(id);
        }
        let last = Self::command()
            .try_get_matches_from(&extended)
            .map_err(|e| Error::Config(format!("{}: {}", file.display(), e.render())))?;
        Ok(Layers {
            first: matches,
            matches: last,
            file: Some(file.clone()),
            from_file,
        })
    }

    /// Every environment variable the node reads.
    pub fn env_vars() -> Vec<String> {
        Self::command()
            .get_arguments()
            .filter_map(|a| a.get_env().map(|e| e.to_string_lossy().into_owned()))
            .collect()
    }

    pub fn s3_options(&self) -> S3Options {
        S3Options {
            endpoint: self.s3_endpoint.clone(),
            access_key_id: self.s3_access_key_id.clone(),
            secret_access_key: self.s3_secret_access_key.clone(),
            region: self.s3_region.clone(),
            allow_http: self.s3_allow_http,
        }
    }

    /// The TLS this node serves (`--tls-cert`, `--tls-key`, `--tls-client-ca`) and the TLS
    /// it calls its peers with, when it has any: its own certificate, and theirs checked
    /// against the client CA. `None` when it serves plaintext.
    #[allow(clippy::type_complexity)]
    pub fn tls(&self) -> Result<Option<(Arc<ServerTls>, Option<Arc<ClientTls>>)>> {
        let Some(identity) = Identity::of(self.tls_cert.as_ref(), self.tls_key.as_ref()) else {
            return Ok(None);
        };
        let server = ServerTls::load(identity.clone(), self.tls_client_ca.clone())
            .map_err(|e| Error::Config(format!("--tls-cert: {e}")))?;
        let has_peers = self.peers.iter().any(|p| !p.trim().is_empty());
        let client = match (&self.tls_client_ca, has_peers) {
            (_, false) => None,
            (Some(ca), true) => Some(
                ClientTls::load(Some(ca.clone()), Some(identity))
                    .map_err(|e| Error::Config(format!("--tls-client-ca: {e}")))?,
            ),
            (None, true) => {
                return Err(Error::Config(
                    "--peers with --tls-cert: peers are called over TLS, and their \
                     certificates are checked against --tls-client-ca; give it (the CA that \
                     signed the cluster's certificates)"
                        .into(),
                ));
            }
        };
        Ok(Some((server, client)))
    }

    /// The address others reach this node at: `--advertise`, else the listen address (the
    /// host name in place of an unspecified IP).
    pub fn advertise_address(&self) -> String {
        if let Some(a) = &self.advertise {
            return a.clone();
        }
        if self.listen.ip().is_unspecified() {
            let host = std::fs::read_to_string("/etc/hostname")
                .ok()
                .map(|h| h.trim().to_owned())
                .filter(|h| !h.is_empty())
                .unwrap_or_else(|| "localhost".into());
            return format!("{host}:{}", self.listen.port());
        }
        self.listen.to_string()
    }

    /// A configuration with defaults, for embedding and tests.
    /// The per-client quotas, when any is set; they need tokens (`with_tokens`), which
    /// tell clients apart.
    pub fn quotas(
        &self,
        with_tokens: bool,
    ) -> Result<Option<std::sync::Arc<crate::quotas::Quotas>>> {
        let bandwidth = self.client_max_bandwidth.map(|b| b.as_u64());
        let quotas = crate::quotas::Quotas::new(self.client_max_streams, bandwidth);
        if quotas.is_some() && !with_tokens {
            return Err(Error::Config(
                "--client-max-streams and --client-max-bandwidth need --auth-tokens-file: a \
                 client is known by the name of its token"
                    .into(),
            ));
        }
        Ok(quotas)
    }

    pub fn with_origin(origin: &str, cache_dir: &std::path::Path) -> Self {
        let mut config = Self::from_args(["cache-node"]).expect("defaults parse");
        config.origin = origin.to_owned();
        config.cache_dir = cache_dir.to_owned();
        config
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_filters_are_levels_or_target_levels() {
        assert!(parse_log_filter("info").is_ok());
        assert!(parse_log_filter("INFO").is_ok());
        assert!(parse_log_filter("warn,cache_node=debug,tower=off").is_ok());
        assert!(
            parse_log_filter("debgu")
                .unwrap_err()
                .contains("not a level")
        );
        assert!(parse_log_filter("cache_node=loud").is_err());
    }

    #[test]
    fn file_fills_what_flags_leave_default() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("node.toml");
        std::fs::write(
            &file,
            "origin = \"s3://models\"\nlisten = \"0.0.0.0:7171\"\nmemory-capacity = \"256MiB\"\n",
        )
        .unwrap();
        let config = Config::from_args([
            "cache-node",
            "--config",
            file.to_str().unwrap(),
            "--listen",
            "127.0.0.1:9999",
        ])
        .unwrap();
        assert_eq!(config.origin, "s3://models");
        assert_eq!(config.listen.port(), 9999);
        assert_eq!(config.memory_capacity, ByteSize::mib(256));
    }

    #[test]
    fn lists_in_the_file_are_toml_arrays_or_comma_strings() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("node.toml");
        let parse = |text: &str| {
            std::fs::write(&file, text).unwrap();
            Config::from_args(["cache-node", "--config", file.to_str().unwrap()]).unwrap()
        };
        let array = parse("precompute = [\"int8\", \"q8_0\"]\npeers = [\"a:7070\", \"b:7070\"]\n");
        let comma = parse("precompute = \"int8,q8_0\"\npeers = \"a:7070,b:7070\"\n");
        assert_eq!(array.precompute, comma.precompute);
        assert_eq!(array.precompute.0.len(), 2);
        assert_eq!(array.peers, ["a:7070", "b:7070"]);
        assert_eq!(array.peers, comma.peers);
        assert!(parse("precompute = []\n").precompute.0.is_empty());
    }

    #[test]
    fn print_config_names_each_value_and_its_source() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("node.toml");
        std::fs::write(
            &file,
            "origin = \"s3://models\"\nlisten = \"0.0.0.0:7171\"\n",
        )
        .unwrap();
        let settings = Config::describe([
            "cache-node",
            "--config",
            file.to_str().unwrap(),
            "--listen",
            "127.0.0.1:9999",
            "--s3-secret-access-key",
            "hunter2",
        ])
        .unwrap();
        let get = |key: &str| settings.iter().find(|s| s.key == key).unwrap().clone();
        assert_eq!(get("listen").value.as_deref(), Some("127.0.0.1:9999"));
        assert_eq!(get("listen").source, "flag");
        assert_eq!(get("origin").value.as_deref(), Some("s3://models"));
        assert!(
            get("origin").source.starts_with("file "),
            "{:?}",
            get("origin")
        );
        assert_eq!(get("revalidate-after").source, "default");
        assert_eq!(get("advertise").value, None);
        assert_eq!(
            get("s3-secret-access-key").value.as_deref(),
            Some("(set, not shown)")
        );
        assert!(settings.iter().all(|s| s.key != "print-config"));
    }

    #[test]
    fn unknown_keys_and_bad_values_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("node.toml");
        std::fs::write(&file, "orgin = \"x\"\n").unwrap();
        let err =
            Config::from_args(["cache-node", "--config", file.to_str().unwrap()]).unwrap_err();
        assert!(err.to_string().contains("unknown key \"orgin\""), "{err}");
        let err = Config::from_args(["cache-node", "--revalidate-after", "soon"]).unwrap_err();
        assert!(err.to_string().contains("soon"), "{err}");
    }

    #[test]
    fn every_flag_has_an_env_var() {
        let vars = Config::env_vars();
        assert!(vars.contains(&"CACHE_NODE_ORIGIN".to_owned()));
        assert_eq!(
            vars.len(),
            Config::command()
                .get_arguments()
                .filter(|a| a.get_id() != "help" && a.get_id() != "version")
                .count()
        );
    }
}
