//! `cache-agent`: the command line on each inference host.

use std::process::ExitCode;

use cache_agent::cli::{Cli, Command};
use cache_agent::{Agent, AgentError, Progress};
use clap::Parser;
use modelcache_proto::Reference;
use modelcache_proto::v1::variant_state::State;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(&cli);
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cache-agent: {e}");
            match e {
                AgentError::InvalidReference(_) => ExitCode::from(2),
                _ => ExitCode::FAILURE,
            }
        }
    }
}

/// Logs go to stderr (stdout carries the paths scripts read): warnings by default, more
/// with `-v`, errors only with `-q`; without either, `RUST_LOG` when it is set.
fn init_logging(cli: &Cli) {
    use tracing_subscriber::EnvFilter;
    let filter = match cli.log_filter() {
        Some(level) => EnvFilter::new(level),
        None => EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn")),
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .init();
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
    let agent = Agent::new(cli.node, dir);
    match cli.command {
        Command::Prefetch { references } => prefetch(&agent, &references).await,
        Command::Get { weights, reference } => {
            let r = Reference::parse(&reference)?;
            let path = agent.get(&r, weights, &Progress::auto()).await?;
            println!("{}", path.display());
            Ok(())
        }
        Command::Verify { sha256, reference } => verify(&agent, sha256, reference).await,
        Command::Ls => {
            for m in agent.ls() {
                println!(
                    "{}\t{}\t{}\t{}",
                    m.reference,
                    m.revision,
                    bytesize::ByteSize(m.size),
                    m.path.display()
                );
            }
            Ok(())
        }
        Command::Stat { reference } => stat(&agent, &reference).await,
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
        Command::Models => models(&agent).await,
    }
}

async fn prefetch(agent: &Agent, references: &[String]) -> Result<(), AgentError> {
    let references = parse_all(references)?;
    let progress = Progress::auto();
    for r in &references {
        let fetched = agent.prefetch(r, &progress).await?;
        println!("{}", fetched.path.display());
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
        println!(
            "{verdict}\t{}\t{}\t{} files{sha}",
            report.reference, report.revision, report.files
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

async fn stat(agent: &Agent, reference: &str) -> Result<(), AgentError> {
    let r = Reference::parse(reference)?;
    let m = agent.stat(&r).await?;
    println!("model     {}:{}", m.name, m.variant);
    println!(
        "revision  {}{}",
        m.revision,
        if m.stale {
            format!(" (stale: {})", m.stale_reason)
        } else {
            String::new()
        }
    );
    println!(
        "size      {} in {} files",
        bytesize::ByteSize(m.total_size),
        m.files.len()
    );
    if let Some(t) = m.tiers {
        println!(
            "tiers     memory {}/{} chunks, disk {}/{} chunks",
            t.memory_chunks, t.total_chunks, t.disk_chunks, t.total_chunks
        );
    }
    for f in &m.files {
        let sha = if f.sha256.is_empty() {
            "(sha256 pending)"
        } else {
            f.sha256.as_str()
        };
        println!("{sha}  {:>12}  {}", f.size, f.path);
        if let Some(p) = &f.provenance {
            println!(
                "    from {} (sha256 {}), {} by {}: {}",
                p.source_path, p.source_sha256, p.variant, p.quantizer_version, p.parameters
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
        println!("variant   {}: {state}", v.variant);
    }
    Ok(())
}

async fn models(agent: &Agent) -> Result<(), AgentError> {
    for m in agent.models().await? {
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
        println!(
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
