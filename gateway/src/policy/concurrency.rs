//! `concurrency`: at most `max` requests in flight; up to `queue` more wait, each at most
//! `queue_timeout`, for a place; the rest get 503 with `Retry-After`. A place is held until the
//! request ends (its permit lives on the request context), so it comes back however the
//! request ends; a client that leaves while queued is noticed only once it has a place.

use crate::proxy::answer::Answer;
use crate::proxy::context::RequestCtx;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// What a limit counts, as configured: a reload with the same spec keeps the limit's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConcurrencySpec {
    pub max: u32,
    pub queue: u32,
    pub queue_timeout: Duration,
}

/// A concurrency limit with its places.
pub struct ConcurrencyLimit {
    /// The policy's name (metrics, carry-over across reloads).
    pub name: Arc<str>,
    pub spec: ConcurrencySpec,
    places: Arc<Semaphore>,
    waiting: AtomicUsize,
    metrics: crate::metrics::ConcurrencyMetrics,
}

/// Gives a queue place back when the wait ends, however it ends.
struct Waiting<'a>(&'a AtomicUsize);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl ConcurrencyLimit {
    /// A limit named `name`.
    pub fn new(name: &str, spec: ConcurrencySpec) -> ConcurrencyLimit {
        ConcurrencyLimit {
            name: name.into(),
            spec,
            places: Arc::new(Semaphore::new(spec.max as usize)),
            waiting: AtomicUsize::new(0),
            metrics: crate::metrics::ConcurrencyMetrics::new(name),
        }
    }

    /// Takes a place for the request (held on the context until it ends), waiting in the
    /// queue if need be, or refuses it.
    pub async fn on_request(&self, ctx: &mut RequestCtx) -> Result<(), Answer> {
        let permit = self.acquire().await?;
        ctx.permits.push(permit);
        Ok(())
    }

    /// A place, when one is free now (the path of a request under the limit).
    pub fn try_admit(&self) -> Option<OwnedSemaphorePermit> {
        let permit = self.places.clone().try_acquire_owned().ok()?;
        self.metrics.admitted.inc();
        Some(permit)
    }

    async fn acquire(&self) -> Result<OwnedSemaphorePermit, Answer> {
        if let Some(permit) = self.try_admit() {
            return Ok(permit);
        }
        if self.waiting.fetch_add(1, Ordering::Relaxed) >= self.spec.queue as usize {
            self.waiting.fetch_sub(1, Ordering::Relaxed);
            self.metrics.queue_full.inc();
            return Err(busy());
        }
        let _waiting = Waiting(&self.waiting);
        let acquired =
            tokio::time::timeout(self.spec.queue_timeout, self.places.clone().acquire_owned())
                .await;
        match acquired {
            Ok(Ok(permit)) => {
                self.metrics.queued.inc();
                Ok(permit)
            }
            _ => {
                self.metrics.timeout.inc();
                Err(busy())
            }
        }
    }
}

fn busy() -> Answer {
    Answer::error(503, "too many requests in flight").with_header(
        http::header::RETRY_AFTER,
        http::HeaderValue::from_static("1"),
    )
}
