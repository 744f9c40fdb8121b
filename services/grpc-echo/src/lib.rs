//! `test.Echo`: a gRPC service with the four call kinds and the standard health service, for
//! the gateway's gRPC tests and benchmark.
//!
//! - `Unary`: the message back, `replica` set to the server's name. A `text` of
//!   `fail:CODE:MESSAGE` answers with that status instead; `delay_ms` waits first.
//! - `ServerStream`: `count` messages, `delay_ms` apart; then, for a `text` of
//!   `fail:CODE:MESSAGE`, that status (in the trailers, after the messages).
//! - `ClientStream`: one message whose `count` is the number received.
//! - `Bidi`: each message back as it arrives.
//!
//! Every call returns the request's `x-echo-bin` metadata as a header; a failed call also
//! returns it, with `x-trailer-bin`, beside its status (binary metadata both ways).

use std::net::SocketAddr;
use std::pin::Pin;
use std::time::Duration;
use tokio_stream::{Stream, StreamExt};
use tonic::metadata::{MetadataMap, MetadataValue};
use tonic::{Request, Response, Status, Streaming};

/// The one message type.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Msg {
    #[prost(string, tag = "1")]
    pub text: String,
    #[prost(uint32, tag = "2")]
    pub count: u32,
    #[prost(uint64, tag = "3")]
    pub delay_ms: u64,
    #[prost(string, tag = "4")]
    pub replica: String,
}

include!(concat!(env!("OUT_DIR"), "/test.Echo.rs"));

pub use echo_client::EchoClient;
pub use echo_server::EchoServer;
pub use tonic_health::server::HealthReporter;
pub use tonic_health::ServingStatus;

/// The service; `name` identifies the replica in answers.
#[derive(Clone)]
pub struct Echo {
    pub name: String,
}

type MsgStream = Pin<Box<dyn Stream<Item = Result<Msg, Status>> + Send>>;

/// The trailer bytes every call sets.
pub const TRAILER_BIN: &[u8] = &[0, 1, 2, 0xfe, 0xff];

fn echo_metadata(from: &MetadataMap, to: &mut MetadataMap) {
    if let Some(v) = from.get_bin("x-echo-bin") {
        to.insert_bin("x-echo-bin", v.clone());
    }
}

fn trailers(from: &MetadataMap) -> MetadataMap {
    let mut t = MetadataMap::new();
    echo_metadata(from, &mut t);
    t.insert_bin("x-trailer-bin", MetadataValue::from_bytes(TRAILER_BIN));
    t
}

fn status_of(text: &str, from: &MetadataMap) -> Option<Status> {
    let rest = text.strip_prefix("fail:")?;
    let (code, message) = rest.split_once(':').unwrap_or((rest, ""));
    let code = tonic::Code::from_i32(code.parse().unwrap_or(2));
    Some(Status::with_metadata(code, message, trailers(from)))
}

#[tonic::async_trait]
impl echo_server::Echo for Echo {
    async fn unary(&self, req: Request<Msg>) -> Result<Response<Msg>, Status> {
        let meta = req.metadata().clone();
        let mut msg = req.into_inner();
        if msg.delay_ms > 0 {
            tokio::time::sleep(Duration::from_millis(msg.delay_ms)).await;
        }
        if let Some(status) = status_of(&msg.text, &meta) {
            return Err(status);
        }
        msg.replica = self.name.clone();
        let mut resp = Response::new(msg);
        echo_metadata(&meta, resp.metadata_mut());
        Ok(resp)
    }

    type ServerStreamStream = MsgStream;

    async fn server_stream(
        &self,
        req: Request<Msg>,
    ) -> Result<Response<Self::ServerStreamStream>, Status> {
        let meta = req.metadata().clone();
        let msg = req.into_inner();
        let msg_text = msg.text.clone();
        let name = self.name.clone();
        let delay = Duration::from_millis(msg.delay_ms);
        let stream = async_stream(msg.count, move |i| {
            let name = name.clone();
            let text = msg.text.clone();
            async move {
                if !delay.is_zero() {
                    tokio::time::sleep(delay).await;
                }
                Msg {
                    text,
                    count: i,
                    delay_ms: 0,
                    replica: name,
                }
            }
        });
        let failure = status_of(&msg_text, &meta).map(Err);
        let stream = stream.chain(tokio_stream::iter(failure));
        let mut resp = Response::new(Box::pin(stream) as MsgStream);
        echo_metadata(&meta, resp.metadata_mut());
        Ok(resp)
    }

    async fn client_stream(&self, req: Request<Streaming<Msg>>) -> Result<Response<Msg>, Status> {
        let meta = req.metadata().clone();
        let mut stream = req.into_inner();
        let mut count = 0;
        let mut last = String::new();
        while let Some(msg) = stream.next().await {
            let msg = msg?;
            count += 1;
            last = msg.text;
        }
        let mut resp = Response::new(Msg {
            text: last,
            count,
            delay_ms: 0,
            replica: self.name.clone(),
        });
        echo_metadata(&meta, resp.metadata_mut());
        Ok(resp)
    }

    type BidiStream = MsgStream;

    async fn bidi(
        &self,
        req: Request<Streaming<Msg>>,
    ) -> Result<Response<Self::BidiStream>, Status> {
        let meta = req.metadata().clone();
        let name = self.name.clone();
        let stream = req.into_inner().map(move |m| {
            m.map(|mut m| {
                m.replica = name.clone();
                m
            })
        });
        let mut resp = Response::new(Box::pin(stream) as MsgStream);
        echo_metadata(&meta, resp.metadata_mut());
        Ok(resp)
    }
}

/// `count` items, each made by `make(i)` in turn.
fn async_stream<F, Fut>(count: u32, make: F) -> impl Stream<Item = Result<Msg, Status>>
where
    F: Fn(u32) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Msg> + Send,
{
    tokio_stream::iter(0..count).then(move |i| {
        let fut = make(i);
        async move { Ok(fut.await) }
    })
}

/// A running server: its address and its health. It runs on a runtime of its own, on a
/// thread of its own, so that killing it drops every connection at once.
pub struct Server {
    pub addr: SocketAddr,
    pub health: HealthReporter,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// TLS for the server: certificate chain and key, PEM.
pub struct Tls {
    pub cert: Vec<u8>,
    pub key: Vec<u8>,
}

impl Server {
    /// Starts `test.Echo` and the health service (both `SERVING`) on a free port of `ip`.
    pub fn start(ip: &str, name: &str, tls: Option<Tls>) -> anyhow::Result<Server> {
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (ip, name) = (ip.to_string(), name.to_string());
        let thread = std::thread::spawn(move || {
            let runtime = match tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = ready_tx.send(Err(anyhow::Error::from(e)));
                    return;
                }
            };
            runtime.block_on(async move {
                match serve(&ip, &name, tls).await {
                    Ok((addr, health, serving)) => {
                        let _ = ready_tx.send(Ok((addr, health)));
                        tokio::select! {
                            _ = serving => {}
                            _ = stopped => {}
                        }
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                    }
                }
            });
            // Every task, the connections' included, ends here.
            runtime.shutdown_background();
        });
        let (addr, health) = ready_rx.recv()??;
        Ok(Server {
            addr,
            health,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// Sets the health of the server as a whole and of `test.Echo`.
    pub async fn set_serving(&self, serving: bool) {
        let status = match serving {
            true => ServingStatus::Serving,
            false => ServingStatus::NotServing,
        };
        self.health.set_service_status("", status).await;
        self.health.set_service_status("test.Echo", status).await;
    }

    /// Stops at once: every connection dropped mid-call, as when the process is killed.
    pub fn kill(mut self) {
        self.stop_now();
    }

    fn stop_now(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop_now();
    }
}

type Serving =
    Pin<Box<dyn std::future::Future<Output = Result<(), tonic::transport::Error>> + Send>>;

/// Binds and starts serving; returns the address, the health reporter and the server future.
async fn serve(
    ip: &str,
    name: &str,
    tls: Option<Tls>,
) -> anyhow::Result<(SocketAddr, HealthReporter, Serving)> {
    let listener = tokio::net::TcpListener::bind((ip, 0)).await?;
    let addr = listener.local_addr()?;
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<EchoServer<Echo>>().await;
    let echo = EchoServer::new(Echo { name: name.into() });
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = tls {
        let identity = tonic::transport::Identity::from_pem(tls.cert, tls.key);
        builder =
            builder.tls_config(tonic::transport::ServerTlsConfig::new().identity(identity))?;
    }
    let router = builder.add_service(health_service).add_service(echo);
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    Ok((addr, health, Box::pin(router.serve_with_incoming(incoming))))
}
