//! `cache-node`: parses flags, binds, and runs until SIGINT/SIGTERM.

use std::process::ExitCode;

use cache_node::Config;

#[tokio::main]
async fn main() -> ExitCode {
    let mut config = match Config::from_args(std::env::args_os()) {
        Ok(config) => config,
        // Help and version on stdout with status 0, usage errors on stderr with status 2.
        Err(cache_node::Error::Cli(e)) => e.exit(),
        Err(e) => {
            eprintln!("cache-node: {e}");
            return ExitCode::from(2);
        }
    };
    if config.print_config {
        return print_config();
    }
    // --log (or the config file's), else RUST_LOG, else info; a bad filter is an error.
    let filter = match config
        .log
        .clone()
        .map(Ok)
        .or_else(modelcache_telemetry::filter_from_env)
    {
        Some(Ok(filter)) => filter,
        Some(Err(e)) => {
            eprintln!("cache-node: {e}");
            return ExitCode::from(2);
        }
        None => "info".to_owned(),
    };
    let telemetry = match modelcache_telemetry::init(modelcache_telemetry::Options {
        service: "cache-node",
        filter,
        format: match config.log_format {
            cache_node::config::LogFormat::Json => modelcache_telemetry::LogFormat::Json,
            cache_node::config::LogFormat::Text => modelcache_telemetry::LogFormat::Text,
        },
        targets: true,
    }) {
        Ok(telemetry) => telemetry,
        Err(e) => {
            eprintln!("cache-node: {e}");
            return ExitCode::from(2);
        }
    };
    let limit = raise_open_file_limit();
    fit_connections_to(limit, &mut config);
    let listener = match tokio::net::TcpListener::bind(config.listen).await {
        Ok(listener) => listener,
        Err(e) => {
            eprintln!("cache-node: cannot listen on {}: {e}", config.listen);
            return ExitCode::FAILURE;
        }
    };
    let ran = cache_node::run(config, listener, shutdown_signal()).await;
    telemetry.shutdown().await;
    match ran {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cache-node: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `--print-config`: every key as the config file takes it, its value and its source.
fn print_config() -> ExitCode {
    match Config::describe(std::env::args_os()) {
        Ok(settings) => {
            for s in settings {
                match s.value {
                    Some(value) => {
                        let line = format!("{} = {value:?}", s.key);
                        println!("{line:<48} # {}", s.source);
                    }
                    None => println!("# {} = (not set)", s.key),
                }
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("cache-node: {e}");
            ExitCode::from(2)
        }
    }
}

/// Raises the soft limit on open files to the hard limit: foyer keeps one file per disk
/// block (a 20 GiB tier has over a thousand) and every connection takes one, so the usual
/// soft limit of 1,024 is too low for the defaults.
fn raise_open_file_limit() -> Option<u64> {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => {
            tracing::debug!(limit, "open file limit");
            Some(limit)
        }
        Err(e) => {
            tracing::warn!("could not raise the open file limit: {e}");
            None
        }
    }
}

/// Files the node keeps open besides its connections: the two tiers' blocks (128 each at
/// most) and a margin for manifests, the origin and the runtime.
const FILES_BESIDE_CONNECTIONS: u64 = 2 * 128 + 128;

/// Lowers `--max-connections` to what the open-file limit leaves room for, so that the
/// node never runs out of descriptors under load (it would fail accepts, then reads).
fn fit_connections_to(limit: Option<u64>, config: &mut cache_node::Config) {
    let Some(limit) = limit else { return };
    let room = limit.saturating_sub(FILES_BESIDE_CONNECTIONS).max(16) as usize;
    if config.max_connections > room {
        tracing::warn!(
            open_file_limit = limit,
            "--max-connections {} does not fit the open-file limit; serving {room} \
             connections at once (raise the limit with `ulimit -n` to serve more)",
            config.max_connections
        );
        config.max_connections = room;
    }
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
    tracing::info!("shutting down");
}
