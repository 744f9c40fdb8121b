//! An API gateway and reverse proxy for Docker Compose microservice stacks, built on Pingora.
//!
//! The modules follow the request and its configuration:
//! [`config`] (the YAML users write) → [`runtime`] (compiled, swapped atomically by [`reload`])
//! → [`downstream`] (client connections: request-head deadline, connection metrics) →
//! [`routing`] and [`upstream`] (replicas, discovery, balancing, health) → [`proxy`] (the
//! request phases, with [`headers`] for what they add) → [`server`] (process assembly, with
//! [`listening`] for when the listeners are bound) and [`admin`];
//! [`logging`] is the process log.

pub mod accesslog;
pub mod admin;
pub mod alloc;
pub mod auth;
pub mod config;
pub mod downstream;
pub mod headers;
pub mod listening;
pub mod logging;
pub mod metrics;
pub mod proxy;
pub mod ratelimit;
pub mod reload;
pub mod routing;
pub mod runtime;
pub mod server;
pub mod text;
pub mod tls;
pub mod trace;
pub mod upstream;
