//! `rolemesh-proxy`: reads its configuration, sets up logging and the runtime, and hands over to
//! [`rolemesh_proxy::run`].

use std::{
    path::{Path, PathBuf},
    process::ExitCode,
};

use clap::Parser;
use rolemesh_profile::logging::{LogFormat, init_logging};
use rolemesh_profile::proxy_config::CONFIG_ENV;
use rolemesh_proxy::cores::{CORES_ENV, CoresSetting, runtime_size};

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
    /// Runtime threads: "auto" sizes them from the container's CPU limit (cgroup v1 or v2 quota,
    /// rounded up, at most the CPUs it may run on; one without a limit), a number fixes them.
    #[arg(long, env = CORES_ENV, default_value = "auto")]
    cores: CoresSetting,
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
    let size = runtime_size(args.cores, Path::new("/"));
    tracing::info!(threads = size.threads.get(), source = %size.source, "runtime sized");
    // One thread runs on the current-thread scheduler: no work-stealing machinery to pay for.
    let runtime = if size.threads.get() == 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(size.threads.get())
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
