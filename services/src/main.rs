//! The thin services behind the gateway, one binary: `services users|products|orders|payments`
//! runs one replica of a service, `services stack` runs the whole local stack, and
//! `services healthcheck URL` is the container health check (minimal images have no curl).

mod common;
mod db;
mod orders;
mod payments;
mod peers;
mod products;
mod stack;
mod users;

use anyhow::Context;
use clap::{Parser, Subcommand};
use std::net::SocketAddr;

#[derive(Parser)]
#[command(name = "services", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// user-service: register, login (JWT), profiles, JWKS.
    Users {
        #[command(flatten)]
        service: ServiceArgs,
        #[command(flatten)]
        tokens: users::TokenSettings,
    },
    /// product-service: catalogue and inventory.
    Products {
        #[command(flatten)]
        service: ServiceArgs,
    },
    /// order-service: orders of signed-in users.
    Orders {
        #[command(flatten)]
        service: ServiceArgs,
    },
    /// payment-service: idempotent charges.
    Payments {
        #[command(flatten)]
        service: ServiceArgs,
    },
    /// Runs the gateway in front of several replicas of every service, without Docker.
    Stack(stack::StackArgs),
    /// Exits 0 when `URL` (http://host:port/path) answers 200 within 3 s, 1 otherwise.
    Healthcheck { url: String },
}

/// Where a service replica listens and which database it uses.
#[derive(clap::Args)]
struct ServiceArgs {
    /// Address to listen on (default 0.0.0.0 and the service's port).
    #[arg(long, env = "LISTEN")]
    listen: Option<SocketAddr>,
    /// `sqlite://FILE?mode=rwc` (default: a file named after the service in the working
    /// directory) or `postgres://user:password@host/db`.
    #[arg(long, env = "DATABASE_URL")]
    database_url: Option<String>,
}

impl ServiceArgs {
    fn resolve(self, name: &str, port: u16) -> (SocketAddr, String) {
        (
            self.listen
                .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], port))),
            self.database_url
                .unwrap_or_else(|| format!("sqlite://{name}.db?mode=rwc")),
        )
    }
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    if let Command::Healthcheck { url } = &cli.command {
        return healthcheck(url);
    }
    let stack = matches!(cli.command, Command::Stack(_));
    if !stack {
        common::init_logging();
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("services: starting the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli.command)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            if stack {
                eprintln!("services stack: {e:#}");
            } else {
                tracing::error!(error = format!("{e:#}"), "exiting");
            }
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Users { service, tokens } => {
            let (listen, url) = service.resolve("users", 3001);
            let db = users::open_db(&url).await?;
            common::serve("user-service", listen, users::router(db, tokens).await?).await
        }
        Command::Products { service } => {
            let (listen, url) = service.resolve("products", 3002);
            let db = products::open_db(&url).await?;
            common::serve("product-service", listen, products::router(db)).await
        }
        Command::Orders { service } => {
            let (listen, url) = service.resolve("orders", 3003);
            let db = orders::open_db(&url).await?;
            let peers = peers::Peers::from_env()?;
            common::serve("order-service", listen, orders::router(db, peers)).await
        }
        Command::Payments { service } => {
            let (listen, url) = service.resolve("payments", 3004);
            let db = payments::open_db(&url).await?;
            let peers = peers::Peers::from_env()?;
            common::serve("payment-service", listen, payments::router(db, peers)).await
        }
        Command::Stack(args) => stack::run(args).await,
        Command::Healthcheck { .. } => Ok(()),
    }
}

fn healthcheck(url: &str) -> std::process::ExitCode {
    let check = || -> anyhow::Result<u16> {
        let rest = url
            .strip_prefix("http://")
            .context("only http:// URLs are checked")?;
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        let addr: SocketAddr = authority
            .parse()
            .context("the URL's host must be an IP address and port")?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        Ok(runtime.block_on(stack::http_get(addr, path))?.0)
    };
    match check() {
        Ok(200) => std::process::ExitCode::SUCCESS,
        Ok(status) => {
            eprintln!("{url}: {status}");
            std::process::ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("{url}: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
