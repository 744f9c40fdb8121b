// Copyright 2026 Cloudflare, Inc.
//
// Licensed under the Apache License, Version 2.0 (the "License");
// you may not use this file except in compliance with the License.
// You may obtain a copy of the License at
//
// http://www.apache.org/licenses/LICENSE-2.0
//
// Unless required by applicable law or agreed to in writing, software
// distributed under the License is distributed on an "AS IS" BASIS,
// WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
// See the License for the specific language governing permissions and
// limitations under the License.

//! A request without a body, to an HTTP/1 upstream, with no cache, no custom downstream and no
//! upgrade: nothing flows from the downstream to the upstream once the header is sent, so the
//! two halves of `proxy_1to1` and the channels between them are not needed. The same filters run
//! in the same order; the response is read and written in turn while the downstream is watched
//! for a close, as the duplex loop watches it.

use super::*;
use crate::proxy_cache::{range_filter::RangeBodyFilter, ServeFromCache};

impl<SV, C> HttpProxy<SV, C>
where
    C: custom::Connector,
{
    /// Whether `proxy_1to1` may take the sequential path for this request.
    pub(crate) fn bodiless_exchange(session: &mut Session, upgrade: bool) -> bool {
        !upgrade
            && !session.cache.enabled()
            && !session.cache.bypassing()
            && !session.downstream_session.is_custom()
            && session.as_mut().is_body_empty()
            && session.as_ref().get_retry_buffer().is_none()
    }

    /// `proxy_1to1`'s two halves for a bodiless request, in turn: (downstream reusable,
    /// upstream reusable).
    pub(crate) async fn proxy_1to1_bodiless(
        &self,
        session: &mut Session,
        client_session: &mut HttpSessionV1,
        ctx: &mut SV::CTX,
    ) -> Result<(bool, bool)>
    where
        SV: ProxyHttp + Send + Sync,
        SV::CTX: Send + Sync,
    {
        // The empty body goes through the request body filters as the pipe would carry it.
        let mut data = None;
        session
            .downstream_modules_ctx
            .request_body_filter(&mut data, true)
            .await?;
        self.inner
            .request_body_filter(session, &mut data, true, ctx)
            .await?;
        let mut upstream_can_reuse = true;
        let mut send_error = None;
        if let Err(e) = send_body_to1(client_session, Some(HttpTask::Body(data, true))).await {
            warn!("send error, draining read buf: {e}");
            upstream_can_reuse = false;
            send_error = Some(e);
        }

        let mut serve_from_cache = ServeFromCache::new();
        let mut range_body_filter = RangeBodyFilter::new();
        let mut tasks = Vec::with_capacity(TASK_BUFFER_SIZE);
        let mut response_done = false;
        while !response_done {
            tokio::select! {
                res = client_session.read_response_task() => {
                    let (mut end, mut failed) = push_task(res, &mut tasks, &mut send_error);
                    // Take what is already read, so a head and its body go out in one write.
                    while !end && tasks.len() < TASK_BUFFER_SIZE {
                        let read = client_session.read_response_task();
                        let Some(res) = tokio::task::unconstrained(read).now_or_never() else {
                            break;
                        };
                        (end, failed) = push_task(res, &mut tasks, &mut send_error);
                    }
                    response_done = end;
                    if failed {
                        // The response's framing was not read to its end.
                        upstream_can_reuse = false;
                    }
                    let downstream_done = self.write_bodiless_tasks(session, ctx, &mut tasks,
                        &mut serve_from_cache, &mut range_body_filter).await?;
                    if downstream_done && !response_done {
                        // The client's answer ended by its own framing (a filter changed the
                        // status or length): the rest of the upstream's is unread.
                        upstream_can_reuse = false;
                        break;
                    }
                }
                body = session.downstream_session.read_body_or_idle(true) => {
                    // With no body to read, only a close or an error ends the wait (bytes of a
                    // pipelined request keep it pending).
                    if let Err(e) = body {
                        return Err(e.into_down());
                    }
                }
            }
        }

        let mut reuse_downstream = true;
        if let Err(e) = session.as_mut().finish_body().await {
            error!("Error finish sending body to downstream: {}", e);
            reuse_downstream = false;
        }
        Ok((reuse_downstream, upstream_can_reuse))
    }

    /// Filter the tasks read from the upstream and write them downstream in one go: whether the
    /// downstream response is complete.
    async fn write_bodiless_tasks(
        &self,
        session: &mut Session,
        ctx: &mut SV::CTX,
        tasks: &mut Vec<HttpTask>,
        serve_from_cache: &mut ServeFromCache,
        range_body_filter: &mut RangeBodyFilter,
    ) -> Result<bool>
    where
        SV: ProxyHttp + Send + Sync,
        SV::CTX: Send + Sync,
    {
        let mut filtered = Vec::with_capacity(tasks.len());
        for mut t in tasks.drain(..) {
            #[cfg(feature = "upstream_modules")]
            if let HttpTask::Header(header, end_of_stream) = &t {
                self.inner
                    .adjust_upstream_modules(session, header, *end_of_stream, ctx)
                    .await?;
            }
            #[cfg(feature = "upstream_modules")]
            session.upstream_modules_filter_task(&mut t).await?;
            session.upstream_compression.response_filter(&mut t);
            let task = self
                .h1_response_filter(session, t, ctx, serve_from_cache, range_body_filter, false)
                .await?;
            filtered.push(task);
        }
        session.write_response_tasks(filtered).await
    }
}

/// Adds a task read from the upstream to `tasks`, a read error as the `Failed` task the duplex
/// path passes on (the earlier send error first, as there): (response ended, read failed).
pub fn push_task(
    res: Result<HttpTask>,
    tasks: &mut Vec<HttpTask>,
    send_error: &mut Option<Box<Error>>,
) -> (bool, bool) {
    match res {
        Ok(task) => {
            let end = task.is_end();
            tasks.push(task);
            (end, false)
        }
        Err(e) => {
            tasks.push(HttpTask::Failed(send_error.take().unwrap_or(e).into_up()));
            (true, true)
        }
    }
}
