//! Calls from one service to another by its service name, as the gateway finds replicas: the
//! name is resolved through DNS on every new connection (Compose's DNS, or the local stack's
//! server named by `DNS_SERVER`), with a timeout and a clear error when the other service is
//! down.

use crate::common::ApiError;
use axum::http::StatusCode;
use hickory_resolver::config::{NameServerConfig, NameServerConfigGroup, ResolverConfig};
use hickory_resolver::name_server::TokioConnectionProvider;
use hickory_resolver::proto::xfer::Protocol;
use hickory_resolver::TokioResolver;
use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use serde_json::Value;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

/// How long a call to another service may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(3);

/// Where the other services are, and a client to reach them.
#[derive(Clone)]
pub struct Peers {
    client: reqwest::Client,
    /// `http://product-service:3002` unless `PRODUCT_SERVICE_URL` says otherwise.
    pub products: String,
    /// `http://order-service:3003` unless `ORDER_SERVICE_URL` says otherwise.
    pub orders: String,
}

/// Resolves service names with hickory: the system's configuration, or `DNS_SERVER`.
struct Dns(TokioResolver);

impl Resolve for Dns {
    fn resolve(&self, name: Name) -> Resolving {
        let resolver = self.0.clone();
        Box::pin(async move {
            let found = resolver.lookup_ip(name.as_str()).await?;
            let addrs: Addrs = Box::new(
                found
                    .into_iter()
                    .map(|ip| SocketAddr::new(ip, 0))
                    .collect::<Vec<_>>()
                    .into_iter(),
            );
            Ok(addrs)
        })
    }
}

fn resolver() -> anyhow::Result<TokioResolver> {
    match std::env::var("DNS_SERVER").ok().filter(|v| !v.is_empty()) {
        Some(server) => {
            let addr: SocketAddr = server
                .parse()
                .map_err(|_| anyhow::anyhow!("DNS_SERVER: `{server}` is not IP:PORT"))?;
            let mut group = NameServerConfigGroup::new();
            group.push(NameServerConfig::new(addr, Protocol::Udp));
            group.push(NameServerConfig::new(addr, Protocol::Tcp));
            let config = ResolverConfig::from_parts(None, vec![], group);
            Ok(
                TokioResolver::builder_with_config(config, TokioConnectionProvider::default())
                    .build(),
            )
        }
        None => Ok(TokioResolver::builder_tokio()?.build()),
    }
}

impl Peers {
    /// The peers named by the environment (`PRODUCT_SERVICE_URL`, `ORDER_SERVICE_URL`,
    /// `DNS_SERVER`).
    pub fn from_env() -> anyhow::Result<Peers> {
        let url = |var: &str, default: &str| {
            std::env::var(var)
                .ok()
                .filter(|v| !v.is_empty())
                .unwrap_or_else(|| default.to_string())
                .trim_end_matches('/')
                .to_string()
        };
        let client = reqwest::Client::builder()
            .no_proxy()
            .timeout(CALL_TIMEOUT)
            .dns_resolver(Arc::new(Dns(resolver()?)))
            .build()?;
        Ok(Peers {
            client,
            products: url("PRODUCT_SERVICE_URL", "http://product-service:3002"),
            orders: url("ORDER_SERVICE_URL", "http://order-service:3003"),
        })
    }

    /// `PUT url` (no body) with the caller's identity headers: `Ok` on a 2xx, else the 503
    /// of [`Peers::get`].
    pub async fn put(
        &self,
        service: &str,
        url: &str,
        identity: &[(&str, &str)],
    ) -> Result<(), ApiError> {
        match self
            .request(reqwest::Method::PUT, url, identity)
            .send()
            .await
        {
            Ok(r) if r.status().is_success() => Ok(()),
            Ok(r) => Err(self.unavailable(service, url, format!("answered {}", r.status()))),
            Err(e) => Err(self.unavailable(service, url, e.to_string())),
        }
    }

    /// A request to `url` carrying the caller's identity headers.
    fn request(
        &self,
        method: reqwest::Method,
        url: &str,
        identity: &[(&str, &str)],
    ) -> reqwest::RequestBuilder {
        identity
            .iter()
            .fold(self.client.request(method, url), |r, (name, value)| {
                r.header(*name, *value)
            })
    }

    fn unavailable(&self, service: &str, url: &str, why: String) -> ApiError {
        tracing::warn!(service, url, error = %why, "call to another service failed");
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("{service} unavailable"),
        )
    }

    /// `GET url` with the caller's identity headers: the JSON body, `None` for a 404, or a 503
    /// naming `service` when it cannot be reached or fails.
    pub async fn get(
        &self,
        service: &str,
        url: &str,
        identity: &[(&str, &str)],
    ) -> Result<Option<Value>, ApiError> {
        let request = self.request(reqwest::Method::GET, url, identity);
        let unavailable = |why: String| self.unavailable(service, url, why);
        let response = request
            .send()
            .await
            .map_err(|e| unavailable(e.to_string()))?;
        match response.status() {
            StatusCode::NOT_FOUND => Ok(None),
            s if s.is_success() => response
                .json()
                .await
                .map(Some)
                .map_err(|e| unavailable(e.to_string())),
            s => Err(unavailable(format!("answered {s}"))),
        }
    }
}
