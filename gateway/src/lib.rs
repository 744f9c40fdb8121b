//! An API gateway and reverse proxy for Docker Compose microservice stacks, built on Pingora.
//!
//! The modules follow the configuration and then the request (`docs/architecture.md` is the
//! map): [`config`] (the YAML users write) → [`plan`] (`compile`: every check, no side effect;
//! `activate`: the side effects) → [`runtime`] (what serves, swapped atomically by [`reload`])
//! → [`downstream`] (client connections) → [`proxy`] (the request phases: head checks, routing
//! with [`routing`], the route's [`policy`] pipeline, [`upstream`] replicas, [`headers`]) →
//! [`server`] (process assembly, with [`listening`]) and [`admin`]; [`logging`] is the process
//! log.

pub mod accesslog;
pub mod acme;
pub mod admin;
pub mod alloc;
pub mod auth;
pub mod config;
pub mod downstream;
pub mod hash;
pub mod headers;
pub mod listening;
pub mod logging;
pub mod metrics;
pub mod plan;
pub mod policy;
pub mod provider;
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
