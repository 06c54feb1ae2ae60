//! `rolemesh-proxy`: reads its configuration, sets up logging and the runtime, and hands over to
//! [`rolemesh_proxy::run`].

use std::{path::PathBuf, process::ExitCode};

use clap::Parser;
use rolemesh_profile::logging::{LogFormat, init_logging};
use rolemesh_profile::proxy_config::CONFIG_ENV;

/// rolemesh's mTLS sidecar.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Configuration file (JSON); takes precedence over the inline configuration.
    #[arg(long, env = "ROLEMESH_PROXY_CONFIG_FILE")]
    config_file: Option<PathBuf>,
    /// Inline configuration (JSON), as the injection webhook sets it.
    #[arg(long, env = CONFIG_ENV, hide_env_values = true)]
    config: Option<String>,
    #[arg(
        long,
        env = "ROLEMESH_PROXY_LOG_FORMAT",
        value_enum,
        default_value = "json"
    )]
    log_format: LogFormat,
    /// Runtime worker threads; 1 runs everything on one thread, which is cheapest for a sidecar.
    #[arg(long, env = "ROLEMESH_PROXY_WORKER_THREADS", default_value_t = 1)]
    worker_threads: usize,
}

fn main() -> ExitCode {
    let args = Args::parse();
    init_logging(args.log_format);
    if rustls::crypto::aws_lc_rs::default_provider()
        .install_default()
        .is_err()
    {
        tracing::warn!("a rustls crypto provider was already installed");
    }
    let config =
        match rolemesh_proxy::load_config(args.config_file.as_deref(), args.config.as_deref()) {
            Ok(config) => config,
            Err(error) => {
                tracing::error!(%error, "cannot start");
                eprintln!("rolemesh-proxy: {error}");
                return ExitCode::from(2);
            }
        };
    let runtime = if args.worker_threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(args.worker_threads)
            .enable_all()
            .build()
    };
    let runtime = match runtime {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("rolemesh-proxy: failed to start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(rolemesh_proxy::run(config, shutdown_signal())) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(%error, "stopped");
            eprintln!("rolemesh-proxy: {error}");
            ExitCode::FAILURE
        }
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(term) => term,
        Err(error) => {
            tracing::error!(%error, "cannot listen for SIGTERM; only Ctrl-C stops the proxy");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = tokio::signal::ctrl_c() => tracing::info!("interrupt received"),
    }
}
