//! The `gateway` command.

use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

#[global_allocator]
static GLOBAL: gateway::alloc::Allocator = gateway::alloc::Allocator;

/// API gateway and reverse proxy: TLS, JWT checks, rate limits, health-checked load balancing
/// across Docker Compose replicas, hot-reloaded YAML routing, Prometheus metrics.
#[derive(Parser)]
#[command(name = "gateway", version, about, long_about = None)]
struct Cli {
    /// Configuration file.
    #[arg(
        short,
        long,
        global = true,
        env = "GATEWAY_CONFIG",
        default_value = "gateway.yaml"
    )]
    config: PathBuf,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Serve traffic (the default).
    Run {
        /// Take the listening sockets over from a running gateway with the same configuration
        /// file (a zero-downtime binary upgrade): start this, then send the running process
        /// SIGQUIT; it hands over its sockets, drains and exits.
        #[arg(long)]
        upgrade: bool,
    },
    /// Validate the configuration and exit: 0 when valid, 1 with file:line:column otherwise.
    Check,
    /// Make development certificates: a local CA (reused when DIR has one) and a leaf
    /// certificate for NAMES (DNS names or IP addresses; the first names the files).
    Certs {
        /// Output directory.
        #[arg(long, default_value = "certs")]
        dir: PathBuf,
        /// Names the certificate is for.
        #[arg(default_values_t = ["localhost".to_string(), "127.0.0.1".to_string(), "gateway".to_string()])]
        names: Vec<String>,
    },
    /// Make an API key: prints the key (give it to the client; it is not kept anywhere) and,
    /// on a second line, the line to add to an `api_key` policy's `keys_file`.
    ApiKey {
        /// The key's name (forwarded upstream, logged as the user).
        name: String,
        /// Its scopes, comma-separated.
        scopes: Option<String>,
    },
    /// Exit 0 when URL answers 200 within 3 s, 1 otherwise: the container health check
    /// (minimal images have no curl).
    Healthcheck {
        /// `http://IP:PORT/PATH`.
        #[arg(default_value = "http://127.0.0.1:9901/ready")]
        url: String,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(Command::Certs { dir, names }) = &cli.command {
        return match gateway::tls::make_dev_certs(dir, names) {
            Ok(files) => {
                for f in files {
                    println!("{}", f.display());
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("certs: {e}");
                ExitCode::FAILURE
            }
        };
    }
    if let Some(Command::ApiKey { name, scopes }) = &cli.command {
        let key = gateway::policy::api_key::new_key();
        let digest = gateway::policy::api_key::digest_hex(&key);
        println!("{key}");
        let line = format!("{name} {digest} {}", scopes.as_deref().unwrap_or(""));
        println!("{}", line.trim_end());
        return ExitCode::SUCCESS;
    }
    if let Some(Command::Healthcheck { url }) = &cli.command {
        return match gateway::admin::probe(url, std::time::Duration::from_secs(3)) {
            Ok(200) => ExitCode::SUCCESS,
            Ok(status) => {
                eprintln!("{url}: {status}");
                ExitCode::FAILURE
            }
            Err(e) => {
                eprintln!("{url}: {e}");
                ExitCode::FAILURE
            }
        };
    }
    gateway::logging::init();

    match cli.command.unwrap_or(Command::Run { upgrade: false }) {
        Command::Check => match gateway::plan::load(&cli.config) {
            Ok(plan) => {
                println!(
                    "{}: configuration is valid ({} routes, {} upstreams)",
                    cli.config.display(),
                    plan.routes.len(),
                    plan.upstreams.len()
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::FAILURE
            }
        },
        Command::Healthcheck { .. } | Command::Certs { .. } | Command::ApiKey { .. } => {
            ExitCode::SUCCESS
        }
        Command::Run { upgrade } => match gateway::server::run(&cli.config, upgrade) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::FAILURE
            }
        },
    }
}
