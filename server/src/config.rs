//! Node configuration: flags, `CACHE_NODE_*` environment variables, and `--config FILE`
//! (TOML with the flags' names as keys). Precedence: flag, then environment, then file,
//! then the default.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use bytesize::ByteSize;
use clap::{CommandFactory, FromArgMatches, Parser, parser::ValueSource};

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

    /// Log filter, `RUST_LOG` syntax.
    #[arg(long, env = "CACHE_NODE_LOG", default_value = "info")]
    pub log: String,
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
        let matches = Self::command()
            .try_get_matches_from(&args)
            .map_err(|e| Error::Cli(Box::new(e)))?;
        let first = Self::from_arg_matches(&matches).map_err(|e| Error::Config(e.to_string()))?;
        let Some(file) = &first.config else {
            return Ok(first);
        };
        let text = std::fs::read_to_string(file)
            .map_err(|e| Error::io(format!("reading config {}", file.display()), e))?;
        let table: toml::Table = text
            .parse()
            .map_err(|e| Error::Config(format!("{}: {e}", file.display())))?;
        let mut extended = args.clone();
        for (key, value) in table {
            let id = key.replace('-', "_");
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
                other => other.to_string(),
            };
            extended.push(format!("--{}={value}", id.replace('_', "-")).into());
        }
        let matches = Self::command()
            .try_get_matches_from(&extended)
            .map_err(|e| Error::Config(format!("{}: {}", file.display(), e.render())))?;
        Self::from_arg_matches(&matches).map_err(|e| Error::Config(e.to_string()))
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

    /// A configuration with defaults, for embedding and tests.
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
