//! Process assembly: load the configuration, start the control plane, hand the listeners to
//! Pingora and run until SIGTERM (graceful, bounded drain) or SIGINT (fast).

use crate::admin::Admin;
use crate::config::{self, LoadedConfig};
use crate::downstream::Downstream;
use crate::plan;
use crate::proxy::Gateway;
use crate::reload::ControlPlane;
use crate::runtime::Bindings;
use anyhow::Context;
use arc_swap::ArcSwap;
use pingora::apps::HttpServerOptions;
use pingora::listeners::{L4BufferSettings, ListenerConfig};
use pingora::proxy::HttpProxy;
use pingora::server::configuration::ServerConf;
use pingora::server::{ExecutionPhase, RunArgs, Server};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tracing::{info, warn};

/// The socket listeners are handed over on for an upgrade: `process.upgrade_socket`, else one
/// named after the configuration file's absolute path, so that an old and a new process started
/// with the same file find each other.
fn upgrade_socket(loaded: &LoadedConfig) -> PathBuf {
    if let Some(path) = &loaded.config.process.upgrade_socket {
        return path.clone();
    }
    // Absolute, but symlinks not followed: a mounted configuration's `..data` link changes
    // its target on every update, and the old and new process must agree.
    let file = std::path::absolute(&loaded.path).unwrap_or_else(|_| loaded.path.clone());
    let key = crate::hash::content(file.as_os_str().as_encoded_bytes());
    std::env::temp_dir().join(format!("gateway-{key:016x}-upgrade.sock"))
}

/// Pingora's process settings for a configuration.
fn server_conf(loaded: &LoadedConfig) -> ServerConf {
    let c = &loaded.config;
    let pid = std::process::id();
    let tmp = std::env::temp_dir();
    let threads = c
        .threads
        .as_ref()
        .map(|t| t.value)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    ServerConf {
        threads,
        work_stealing: c.work_stealing,
        grace_period_seconds: Some(c.shutdown.grace_period.0.as_secs()),
        graceful_shutdown_timeout_seconds: Some(c.shutdown.final_timeout.0.as_secs().max(1)),
        pid_file: c
            .process
            .pid_file
            .clone()
            .unwrap_or_else(|| tmp.join(format!("gateway-{pid}.pid")))
            .to_string_lossy()
            .into_owned(),
        upgrade_sock: upgrade_socket(loaded).to_string_lossy().into_owned(),
        // Retries are decided per route in the proxy; this is only Pingora's outer fail-safe.
        max_retries: 16,
        upstream_keepalive_pool_size: c.upstream_keepalive_pool,
        // Tokio's timer for every timeout of a second or more. The upstream read timeout is armed
        // on each request and nearly always cancelled; Pingora's fast timer keeps a cancelled
        // one until its deadline, and Tokio's removes it.
        fast_timeout_to_tokio_threshold_seconds: Some(0),
        ..ServerConf::default()
    }
}

/// Tries for an address that another process holds at start, as nginx does (5 tries, 0.5 s
/// apart).
const ADDRESS_TRIES: u32 = 5;
const ADDRESS_RETRY: Duration = Duration::from_millis(500);

/// Fails, naming the field, when a listener or admin address cannot be bound: in use by another
/// process (after [`ADDRESS_TRIES`]), or not an address of this host. Pingora would instead
/// retry for 30 s and then stop the proxy service, while the process lived on. An address
/// taken after this check is caught by [`crate::listening::watch`].
fn check_addresses(loaded: &LoadedConfig) -> Result<(), config::ConfigError> {
    let c = &loaded.config;
    let listeners = c
        .listeners
        .value
        .iter()
        .map(|(name, l)| (format!("listeners.{name}.address"), &l.address));
    let admin = c
        .admin
        .iter()
        .map(|a| ("admin.address".to_string(), &a.address));
    for (field, address) in listeners.chain(admin) {
        let mut tries = 1;
        loop {
            // Bound and let go at once; std sets SO_REUSEADDR as Pingora does, so a port in
            // TIME_WAIT is not taken for one in use.
            match std::net::TcpListener::bind(address.value.0) {
                Ok(_) => break,
                Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && tries < ADDRESS_TRIES => {
                    warn!(%field, address = %address.value.0, "address in use, trying again");
                    std::thread::sleep(ADDRESS_RETRY);
                    tries += 1;
                }
                Err(e) => {
                    return Err(config::ConfigError::at(
                        &loaded.path,
                        &address.referenced,
                        field,
                        format!("cannot listen on {}: {e}", address.value.0),
                    ))
                }
            }
        }
    }
    Ok(())
}

/// How long nothing may be in flight before a draining gateway exits: a connection whose
/// request has just arrived is counted a moment later.
const DRAINED_FOR: Duration = Duration::from_millis(100);

/// Client connections still open, and requests in flight. Idle keep-alive connections are
/// closed when a drain begins, so what stays open is a connection reading its request head or
/// being answered.
fn still_busy() -> bool {
    use prometheus::core::Collector;
    let m = &crate::metrics::METRICS;
    let open: f64 = m
        .connections
        .collect()
        .iter()
        .flat_map(|family| family.get_metric())
        .map(|metric| metric.get_gauge().get_value())
        .sum();
    m.in_flight.get() > 0 || open > 0.0
}

/// Ends the process once no client connection has been open and no request in flight for
/// [`DRAINED_FOR`], rather than at the end of the grace period (which still bounds the drain).
/// The access log and span export are flushed first.
async fn exit_when_drained(runtime: Arc<ArcSwap<crate::runtime::Runtime>>) {
    let mut idle_since: Option<tokio::time::Instant> = None;
    loop {
        tokio::time::sleep(Duration::from_millis(10)).await;
        if still_busy() {
            idle_since = None;
            continue;
        }
        let since = *idle_since.get_or_insert_with(tokio::time::Instant::now);
        if since.elapsed() >= DRAINED_FOR {
            break;
        }
    }
    // Blocking waits for the writers, off the runtime's scheduling.
    tokio::task::block_in_place(|| {
        if let Some(log) = &runtime.load().access_log {
            log.finish(Duration::from_secs(1));
        }
        crate::trace::stop_export();
    });
    info!("drained: no request in flight; stopped");
    std::process::exit(0);
}

/// Runs the gateway with the configuration at `path` until shutdown. With `upgrade`, the
/// listening sockets are taken over from the running gateway of the same file instead of bound.
pub fn run(path: &Path, upgrade: bool) -> anyhow::Result<()> {
    let loaded = config::load(path).map_err(|e| anyhow::anyhow!("{e}"))?;
    let compiled = plan::compile(&loaded).map_err(|e| anyhow::anyhow!("{e}"))?;
    if !upgrade {
        // In an upgrade the running process holds the addresses, and hands them over.
        check_addresses(&loaded).map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    let bindings = Bindings::of(&loaded.config);

    // The control plane (discovery, health checks, reloads) runs on its own small runtime so
    // that it neither competes with nor depends on the proxy threads.
    let control = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("gateway-control")
        .enable_all()
        .build()
        .context("starting the control-plane runtime")?;
    // Made before any task starts: ACME managers make no order before the listeners are bound.
    let listeners_bound = Arc::new(AtomicBool::new(false));
    crate::acme::listeners_bound_at(listeners_bound.clone());
    let first = control
        .block_on(plan::activate(compiled, None, 1))
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    crate::metrics::METRICS.config_applied(first.generation, first.source_hash);
    let shared = Arc::new(ArcSwap::from_pointee(first));
    {
        let _in_runtime = control.enter();
        plan::start_tasks(&shared.load());
    }
    let plane = Arc::new(ControlPlane::new(
        path.to_path_buf(),
        shared.clone(),
        bindings,
    ));
    control.spawn(plane.clone().watch(loaded.config.reload.value.clone()));
    if let Some(docker) = &loaded.config.providers.docker {
        control.spawn(crate::provider::docker::run(
            docker.value.clone(),
            plane.clone(),
        ));
    }

    if let Some(traces) = &loaded.config.traces {
        crate::trace::start_export(traces)
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        info!(endpoint = %traces.otlp_endpoint.value, "exporting spans");
    }

    let opt = upgrade.then(|| pingora::server::configuration::Opt {
        upgrade: true,
        ..Default::default()
    });
    if upgrade {
        info!(socket = %upgrade_socket(&loaded).display(), "upgrade: waiting for the running gateway's listeners (send it SIGQUIT)");
    }
    let mut server = Server::new_with_opt_and_conf(opt, server_conf(&loaded));
    let conf = server.configuration.clone();

    let mut server_options = HttpServerOptions::default();
    server_options.h2c = loaded.config.h2c;
    let mut proxy = HttpProxy::new(Gateway::new(shared.clone()), conf.clone());
    proxy.server_options = Some(server_options);
    proxy.handle_init_modules();
    let mut listeners = Vec::new();
    for (name, l) in &loaded.config.listeners.value {
        let tls = match (&l.tls, shared.load().tls_stores.get(name)) {
            (Some(tls), Some(store)) => {
                Some(crate::tls::acceptor(store.clone(), tls).map_err(|e| {
                    anyhow::anyhow!("{}: listeners.{name}.tls: {e}", path.display())
                })?)
            }
            _ => None,
        };
        listeners.push((name.clone(), l.address.value.0, tls));
    }
    let handing_over = Arc::new(AtomicBool::new(false));
    let app = Downstream::new(
        proxy,
        shared.clone(),
        listeners,
        loaded.config.h2c,
        handing_over.clone(),
    );
    let mut proxy = pingora::services::listening::Service::new("gateway".to_string(), app);
    for (name, l) in &loaded.config.listeners.value {
        let addr = l.address.value.0.to_string();
        // TLS listeners are bound as TCP: the service makes the handshake itself (bounded,
        // counted), see `downstream`.
        let listener = ListenerConfig::tcp(addr.clone())
            .l4_buffer(L4BufferSettings::default().read(l.read_buffer));
        info!(listener = %name, address = %addr, tls = l.tls.is_some(), "listening");
        proxy.add_listener(listener);
    }
    server.add_service(proxy);

    // Pingora binds the listeners in its service threads; `/ready` waits for them, and a
    // listener that cannot be bound ends the process rather than leaving it up without it.
    let addresses = loaded
        .config
        .listeners
        .value
        .iter()
        .map(|(name, l)| (format!("listeners.{name}.address"), l.address.value.0))
        .collect();
    control.spawn(crate::listening::watch_or_exit(
        addresses,
        listeners_bound.clone(),
    ));

    let draining = Arc::new(AtomicBool::new(false));
    if let Some(admin) = &loaded.config.admin {
        let mut svc = pingora::services::listening::Service::new(
            "admin".to_string(),
            Admin::new(shared.clone(), listeners_bound, draining.clone()),
        );
        svc.threads = Some(1);
        let addr = admin.address.value.0.to_string();
        info!(address = %addr, "admin listening");
        svc.add_tcp(&addr);
        server.add_service(svc);
    }

    let mut phases = server.watch_execution_phase();
    let finished = shared.clone();
    control.spawn(async move {
        while let Ok(phase) = phases.recv().await {
            if matches!(phase, ExecutionPhase::GracefulUpgradeTransferringFds) {
                info!("upgrade: handing the listeners to the new process");
                handing_over.store(true, Ordering::Relaxed);
            }
            let terminating = matches!(phase, ExecutionPhase::GracefulTerminate);
            let stopping = terminating || matches!(phase, ExecutionPhase::ShutdownStarted);
            if stopping && !draining.swap(true, Ordering::Relaxed) {
                info!("shutting down: draining in-flight requests");
            }
            if terminating && !handing_over.load(Ordering::Relaxed) {
                tokio::spawn(exit_when_drained(finished.clone()));
            }
        }
    });

    server.bootstrap();
    server.run(RunArgs::default());
    control.shutdown_timeout(std::time::Duration::from_millis(200));
    if let Some(log) = &shared.load().access_log {
        log.finish(std::time::Duration::from_secs(1));
    }
    crate::trace::stop_export();
    info!("stopped");
    Ok(())
}
