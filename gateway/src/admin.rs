//! The admin listener: `/health` (the process answers) and `/ready` (a runtime is loaded and
//! the process is not draining), for orchestrators.

use crate::runtime::Runtime;
use arc_swap::ArcSwap;
use async_trait::async_trait;
use http::Response;
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// The admin HTTP app.
pub struct Admin {
    runtime: Arc<ArcSwap<Runtime>>,
    draining: Arc<AtomicBool>,
}

impl Admin {
    /// An admin app reading `runtime`; `draining` turns true on SIGTERM.
    pub fn new(runtime: Arc<ArcSwap<Runtime>>, draining: Arc<AtomicBool>) -> Admin {
        Admin { runtime, draining }
    }
}

fn json(status: u16, body: String) -> Response<Vec<u8>> {
    let body = body.into_bytes();
    Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, "application/json")
        .header(http::header::CONTENT_LENGTH, body.len())
        .body(body)
        .unwrap_or_default()
}

#[async_trait]
impl ServeHttp for Admin {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let path = session.req_header().uri.path();
        match path {
            "/health" => json(200, "{\"status\":\"ok\"}\n".into()),
            "/ready" => {
                let rt = self.runtime.load();
                if self.draining.load(Ordering::Relaxed) {
                    json(503, "{\"status\":\"draining\"}\n".into())
                } else {
                    json(
                        200,
                        format!(
                            "{{\"status\":\"ready\",\"config_generation\":{},\"config_hash\":\"{:016x}\"}}\n",
                            rt.generation, rt.source_hash
                        ),
                    )
                }
            }
            _ => json(404, "{\"error\":\"not found\",\"status\":404}\n".into()),
        }
    }
}
