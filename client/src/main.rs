//! `cache-agent`: the command line on each inference host.

use std::process::ExitCode;

use cache_agent::cli::{AdminCommand, Cli, Command, DaemonArgs};
use cache_agent::{Agent, AgentError, Progress};
use clap::Parser;
use modelcache_proto::Reference;
use modelcache_proto::v1::variant_state::State;

/// `println!` that ends the process quietly (status 0) when stdout is closed, as when the
/// output is piped into `head`: the reader has what it wanted.
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        if let Err(e) = writeln!(std::io::stdout().lock(), $($arg)*) {
            if e.kind() == std::io::ErrorKind::BrokenPipe {
                std::process::exit(0);
            }
            eprintln!("cache-agent: writing to stdout: {e}");
            std::process::exit(1);
        }
    }};
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let telemetry = match init_logging(&cli) {
        Ok(telemetry) => telemetry,
        Err(e) => {
            eprintln!("cache-agent: {e}");
            return ExitCode::from(2);
        }
    };
    let ran = run(cli).await;
    telemetry.shutdown().await;
    match ran {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cache-agent: {e}");
            match e {
                // A malformed reference, or one the node refused as such (an unknown or
                // inapplicable variant).
                AgentError::InvalidReference(_)
                | AgentError::Invalid { .. }
                | AgentError::Config { .. } => ExitCode::from(2),
                _ => ExitCode::FAILURE,
            }
        }
    }
}

/// Logs go to stderr (stdout carries the paths scripts read): warnings by default, more
/// with `-v`, errors only with `-q`; without either, `RUST_LOG` when it is set (a filter
/// that is not one is an error). Spans are exported when the `OTEL_*` variables say so.
fn init_logging(cli: &Cli) -> Result<modelcache_telemetry::Telemetry, String> {
    let filter = match cli.log_filter() {
        Some(level) => level.to_owned(),
        None => modelcache_telemetry::filter_from_env()
            .transpose()?
            .unwrap_or_else(|| "warn".to_owned()),
    };
    modelcache_telemetry::init(modelcache_telemetry::Options {
        service: "cache-agent",
        filter,
        format: modelcache_telemetry::LogFormat::Text,
        targets: false,
    })
}

/// The token to present: `--token-file`'s, else `CACHE_AGENT_TOKEN`, else none.
fn token(file: Option<&std::path::Path>) -> Result<Option<String>, AgentError> {
    if let Some(path) = file {
        let token = modelcache_proto::auth::read_token_file(path)
            .map_err(|message| AgentError::Config { message })?;
        return Ok(Some(token));
    }
    Ok(std::env::var("CACHE_AGENT_TOKEN")
        .ok()
        .map(|t| t.trim().to_owned())
        .filter(|t| !t.is_empty()))
}

/// The TLS `https://` nodes are called with: `--ca` (else the system's bundle), and for
/// mutual TLS `--cert` and `--key`; loaded when any of them is given or a node is
/// `https://`, so that a bad file is reported before anything else happens.
fn client_tls(
    ca: &Option<std::path::PathBuf>,
    cert: &Option<std::path::PathBuf>,
    key: &Option<std::path::PathBuf>,
    nodes: &[String],
) -> Result<Option<std::sync::Arc<modelcache_proto::tls::ClientTls>>, AgentError> {
    let https = nodes.iter().any(|n| modelcache_proto::tls::is_https(n));
    if ca.is_none() && cert.is_none() && !https {
        return Ok(None);
    }
    let identity = modelcache_proto::tls::Identity::of(cert.as_ref(), key.as_ref());
    modelcache_proto::tls::ClientTls::load(ca.clone(), identity)
        .map(Some)
        .map_err(|e| AgentError::Config {
            message: e.to_string(),
        })
}

fn parse_all(references: &[String]) -> Result<Vec<Reference>, AgentError> {
    references
        .iter()
        .map(|r| Reference::parse(r).map_err(AgentError::from))
        .collect()
}

async fn run(cli: Cli) -> Result<(), AgentError> {
    let dir = cli.dir.unwrap_or_else(Agent::default_dir);
    let dir =
        std::path::absolute(&dir).map_err(|e| AgentError::io(format!("{}", dir.display()), e))?;
    let node_urls = cli.node.clone();
    let agent = Agent::new(cli.node, dir)
        .with_direct(cli.direct)
        .with_offline(cli.offline)
        .with_idle_timeout(cli.idle_timeout);
    let agent = match token(cli.token_file.as_deref())? {
        Some(token) => agent.with_token(&token)?,
        None => agent,
    };
    let agent = match client_tls(&cli.ca, &cli.cert, &cli.key, &node_urls)? {
        Some(tls) => agent.with_tls(tls),
        None => agent,
    };
    let json = cli.json;
    let progress = || {
        if cli.quiet || json {
            Progress::hidden()
        } else {
            Progress::auto()
        }
    };
    match cli.command {
        Command::Prefetch { references } => prefetch(&agent, &references, json, progress()).await,
        Command::Get { weights, reference } => {
            let r = Reference::parse(&reference)?;
            let path = agent.get(&r, weights, &progress()).await?;
            if json {
                out!(
                    "{}",
                    serde_json::json!({"reference": r.to_string(), "path": path})
                );
            } else {
                out!("{}", path.display());
            }
            Ok(())
        }
        Command::Verify { sha256, reference } => verify(&agent, sha256, reference).await,
        Command::Daemon(args) => daemon(agent, *args).await,
        Command::Ls if json => {
            let models: Vec<_> = agent
                .ls()
                .into_iter()
                .map(|m| {
                    serde_json::json!({
                        "reference": m.reference.to_string(),
                        "name": m.reference.name(),
                        "variant": m.reference.variant(),
                        "revision": m.revision,
                        "size": m.size,
                        "path": m.path,
                    })
                })
                .collect();
            out!("{}", serde_json::Value::Array(models));
            Ok(())
        }
        Command::Ls => {
            for m in agent.ls() {
                out!(
                    "{}\t{}\t{}\t{}",
                    m.reference,
                    m.revision,
                    bytesize::ByteSize(m.size),
                    m.path.display()
                );
            }
            Ok(())
        }
        Command::Stat { reference } => stat(&agent, &reference, json).await,
        Command::Rm { reference } => {
            let r = Reference::parse(&reference)?;
            if !agent.rm(&r)? {
                return Err(AgentError::NotPresent {
                    reference: r.to_string(),
                    dir: agent.layout().root().display().to_string(),
                });
            }
            Ok(())
        }
        Command::Models => models(&agent, json).await,
        Command::Nodes { reference } => nodes(&agent, reference, json).await,
        Command::Admin(command) => admin(&node_urls, agent.credentials(), command, json).await,
    }
}

/// `cache-agent daemon`: prints the address it serves on (one line) once it does.
async fn daemon(agent: Agent, args: DaemonArgs) -> Result<(), AgentError> {
    let listen = args
        .listen
        .parse()
        .map_err(|message| AgentError::Daemon { message })?;
    let options = cache_agent::daemon::Options {
        listen,
        socket_mode: args.socket_mode,
        prefetch: args.prefetch,
        prefetch_file: args.prefetch_file,
        max_size: args.max_size,
        max_bandwidth: args.max_bandwidth,
        refresh_interval: (!args.refresh_interval.is_zero()).then_some(args.refresh_interval),
        verify_rate: args.verify_rate,
        metrics_listen: args.metrics_listen,
        tokens: args
            .auth_tokens_file
            .as_deref()
            .map(modelcache_proto::auth::Tokens::load)
            .transpose()
            .map_err(|message| AgentError::Config { message })?,
        tls: daemon_tls(&args.tls_cert, &args.tls_key, &args.tls_client_ca)?,
    };
    let tcp = matches!(options.listen, cache_agent::daemon::socket::Listen::Tcp(_));
    if options.tls.is_some() && !tcp {
        return Err(AgentError::Config {
            message: "--tls-cert is for a TCP --listen (HOST:PORT); a unix socket relies on \
                      its file permissions"
                .into(),
        });
    }
    let mutual = options.tls.as_ref().is_some_and(|t| t.mutual());
    if let cache_agent::daemon::socket::Listen::Tcp(addr) = &options.listen
        && !addr.ip().is_loopback()
        && options.tokens.is_none()
        && !mutual
    {
        tracing::warn!(
            %addr,
            "the daemon listens on TCP beyond loopback without --auth-tokens-file: anyone \
             who can reach {addr} can use it"
        );
    }
    // Certificates the daemon calls nodes with are read again when they change, too.
    if let Some(tls) = agent.credentials().tls.clone() {
        tokio::spawn(modelcache_proto::tls::watch(tls));
    }
    cache_agent::daemon::run(agent, options, |address| out!("{address}")).await
}

/// The daemon's TLS: `--tls-cert` and `--tls-key`, with `--tls-client-ca` for mutual TLS.
fn daemon_tls(
    cert: &Option<std::path::PathBuf>,
    key: &Option<std::path::PathBuf>,
    client_ca: &Option<std::path::PathBuf>,
) -> Result<Option<std::sync::Arc<modelcache_proto::tls::ServerTls>>, AgentError> {
    let Some(identity) = modelcache_proto::tls::Identity::of(cert.as_ref(), key.as_ref()) else {
        return Ok(None);
    };
    modelcache_proto::tls::ServerTls::load(identity, client_ca.clone())
        .map(Some)
        .map_err(|e| AgentError::Config {
            message: format!("--tls-cert: {e}"),
        })
}

/// `cache-agent admin …`: one line per node (`ID ADDRESS` and the revision it serves, or
/// `error: …`), or a JSON array with `--json`; fails when the call failed on any node.
async fn admin(
    nodes: &[String],
    credentials: &cache_agent::node::Credentials,
    command: AdminCommand,
    json: bool,
) -> Result<(), AgentError> {
    use AdminCommand::*;
    let (reference, cluster) = match &command {
        Invalidate { reference, cluster }
        | Revalidate { reference, cluster }
        | Pin { reference, cluster }
        | Unpin { reference, cluster } => (reference.clone(), *cluster),
        Pins { cluster } => (String::new(), *cluster),
    };
    let listing = matches!(command, Pins { .. });
    if !listing {
        Reference::parse(&reference)?;
    }
    let mut client = cache_agent::node::admin(nodes, credentials).await?;
    let request = modelcache_proto::v1::AdminRequest { reference, cluster };
    let answer = match command {
        Invalidate { .. } => client.invalidate(request).await?,
        Revalidate { .. } => client.revalidate(request).await?,
        Pin { .. } => client.pin(request).await?,
        Unpin { .. } => client.unpin(request).await?,
        Pins { .. } => client.pins(request).await?,
    };
    let outcomes = answer.into_inner().nodes;
    for n in outcomes.iter().filter(|_| !json) {
        let size = bytesize::ByteSize::b(n.bytes).display().iec();
        match (n.error.is_empty(), n.revision.is_empty()) {
            (false, _) => out!("{}\t{}\terror: {}", n.node_id, n.address, n.error),
            (true, false) if n.bytes > 0 => {
                out!("{}\t{}\t{}\t{size}", n.node_id, n.address, n.revision)
            }
            (true, false) => out!("{}\t{}\t{}", n.node_id, n.address, n.revision),
            (true, true) if !n.pins.is_empty() => {
                for p in &n.pins {
                    let size = bytesize::ByteSize::b(p.bytes).display().iec();
                    out!(
                        "{}\t{}\t{}\t{}\t{size}",
                        n.node_id,
                        n.address,
                        p.reference,
                        p.revision
                    );
                }
            }
            (true, true) if listing => out!("{}\t{}\tno pins", n.node_id, n.address),
            (true, true) => out!("{}\t{}\tok", n.node_id, n.address),
        }
    }
    if json {
        let list: Vec<_> = outcomes
            .iter()
            .map(|n| {
                let pins: Vec<_> = n
                    .pins
                    .iter()
                    .map(|p| {
                        serde_json::json!({"reference": p.reference, "revision": p.revision,
                        "bytes": p.bytes})
                    })
                    .collect();
                serde_json::json!({"id": n.node_id, "address": n.address,
                    "revision": n.revision, "bytes": n.bytes, "pins": pins, "error": n.error})
            })
            .collect();
        out!("{}", serde_json::Value::Array(list));
    }
    let failed = outcomes.iter().filter(|n| !n.error.is_empty()).count();
    if failed > 0 {
        return Err(AgentError::Node {
            code: tonic::Code::Unavailable,
            message: format!(
                "the call failed on {failed} of {} nodes (the lines above say why)",
                outcomes.len()
            ),
        });
    }
    Ok(())
}

async fn nodes(agent: &Agent, reference: Option<String>, json: bool) -> Result<(), AgentError> {
    let r = reference.as_deref().map(Reference::parse).transpose()?;
    let members = agent.members(r.as_ref().map(Reference::name)).await?;
    if json {
        let text = serde_json::to_string_pretty(&members).expect("members serialize");
        out!("{text}");
        return Ok(());
    }
    for m in &members {
        let health = if m.healthy {
            "healthy".to_owned()
        } else {
            format!("down ({})", m.detail)
        };
        out!("{}\t{}\t{health}", m.address, m.id);
    }
    Ok(())
}

async fn prefetch(
    agent: &Agent,
    references: &[String],
    json: bool,
    progress: Progress,
) -> Result<(), AgentError> {
    let references = parse_all(references)?;
    let mut done = Vec::new();
    for r in &references {
        let fetched = agent.prefetch(r, &progress).await?;
        if json {
            done.push(serde_json::json!({
                "reference": r.to_string(),
                "path": fetched.path,
                "revision": fetched.revision,
                "size": fetched.total_size,
                "transferred": fetched.transferred,
                "offline": fetched.offline,
            }));
        } else {
            out!("{}", fetched.path.display());
        }
    }
    if json {
        out!("{}", serde_json::Value::Array(done));
    }
    Ok(())
}

async fn verify(agent: &Agent, sha256: bool, reference: Option<String>) -> Result<(), AgentError> {
    let r = reference.as_deref().map(Reference::parse).transpose()?;
    let reports = agent.verify(r.as_ref(), sha256).await?;
    let mut bad = 0;
    for report in &reports {
        for p in &report.problems {
            eprintln!("{}: {}: {}", report.reference, p.path, p.detail);
        }
        let sha = if sha256 {
            format!(
                ", sha256 {} checked, {} not known yet",
                report.sha256_checked,
                report.sha256_unknown.len()
            )
        } else {
            String::new()
        };
        let verdict = if report.problems.is_empty() {
            "ok"
        } else {
            "CORRUPT"
        };
        out!(
            "{verdict}\t{}\t{}\t{} files{sha}",
            report.reference,
            report.revision,
            report.files
        );
        bad += usize::from(!report.problems.is_empty());
    }
    if bad > 0 {
        return Err(AgentError::Corrupt {
            reference: format!("{bad} model(s)"),
            detail: "failed verification; `cache-agent rm` and prefetch them again".into(),
        });
    }
    Ok(())
}

async fn stat(agent: &Agent, reference: &str, json: bool) -> Result<(), AgentError> {
    let r = Reference::parse(reference)?;
    let m = agent.stat(&r).await?;
    if json {
        let tiers = m.tiers.map(|t| {
            serde_json::json!({
                "memory_chunks": t.memory_chunks,
                "disk_chunks": t.disk_chunks,
                "total_chunks": t.total_chunks,
            })
        });
        let files: Vec<_> = m
            .files
            .iter()
            .map(|f| serde_json::json!({"path": f.path, "size": f.size, "sha256": f.sha256}))
            .collect();
        let variants: Vec<_> = m
            .variants
            .iter()
            .map(|v| {
                serde_json::json!({
                    "variant": v.variant,
                    "state": v.state().as_str_name().to_ascii_lowercase(),
                    "revision": v.revision,
                    "size": v.total_size,
                    "reason": v.reason,
                })
            })
            .collect();
        let value = serde_json::json!({
            "reference": r.to_string(),
            "name": m.name,
            "variant": m.variant,
            "revision": m.revision,
            "stale": m.stale,
            "size": m.total_size,
            "tiers": tiers,
            "files": files,
            "variants": variants,
        });
        out!("{value}");
        return Ok(());
    }
    out!("model     {}:{}", m.name, m.variant);
    out!(
        "revision  {}{}",
        m.revision,
        if m.stale {
            format!(" (stale: {})", m.stale_reason)
        } else {
            String::new()
        }
    );
    out!(
        "size      {} in {} files",
        bytesize::ByteSize(m.total_size),
        m.files.len()
    );
    if let Some(t) = m.tiers {
        out!(
            "tiers     memory {}/{} chunks, disk {}/{} chunks",
            t.memory_chunks,
            t.total_chunks,
            t.disk_chunks,
            t.total_chunks
        );
    }
    for f in &m.files {
        let sha = if f.sha256.is_empty() {
            "(sha256 pending)"
        } else {
            f.sha256.as_str()
        };
        out!("{sha}  {:>12}  {}", f.size, f.path);
        if let Some(p) = &f.provenance {
            out!(
                "    from {} (sha256 {}), {} by {}: {}",
                p.source_path,
                p.source_sha256,
                p.variant,
                p.quantizer_version,
                p.parameters
            );
        }
    }
    for v in &m.variants {
        let state = match v.state() {
            State::Absent => "absent".to_owned(),
            State::Building => "building".to_owned(),
            State::Ready => format!(
                "ready, {} (revision {})",
                bytesize::ByteSize(v.total_size),
                v.revision
            ),
            State::Failed => format!("failed: {}", v.reason),
        };
        out!("variant   {}: {state}", v.variant);
    }
    Ok(())
}

async fn models(agent: &Agent, json: bool) -> Result<(), AgentError> {
    let models = agent.models().await?;
    if json {
        let value: Vec<_> = models
            .iter()
            .map(|m| {
                let cached: Vec<_> = m
                    .cached
                    .iter()
                    .map(|c| {
                        let t = c.tiers.unwrap_or_default();
                        serde_json::json!({
                            "variant": c.variant,
                            "size": c.total_size,
                            "memory_chunks": t.memory_chunks,
                            "disk_chunks": t.disk_chunks,
                            "total_chunks": t.total_chunks,
                        })
                    })
                    .collect();
                serde_json::json!({"name": m.name, "cached": cached})
            })
            .collect();
        out!("{}", serde_json::Value::Array(value));
        return Ok(());
    }
    for m in models {
        let cached: Vec<String> = m
            .cached
            .iter()
            .map(|c| {
                let t = c.tiers.unwrap_or_default();
                format!(
                    "{} ({} memory {}/{} disk {}/{})",
                    c.variant,
                    bytesize::ByteSize(c.total_size),
                    t.memory_chunks,
                    t.total_chunks,
                    t.disk_chunks,
                    t.total_chunks
                )
            })
            .collect();
        out!(
            "{}\t{}",
            m.name,
            if cached.is_empty() {
                "-".to_owned()
            } else {
                cached.join(", ")
            }
        );
    }
    Ok(())
}
