//! `grpc-echo [ADDRESS] [NAME]`: serves `test.Echo` and the health service in the clear
//! (h2c) on ADDRESS (default `127.0.0.1:50051`) until stopped.

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let address = args.next().unwrap_or_else(|| "127.0.0.1:50051".into());
    let name = args.next().unwrap_or_else(|| "grpc-echo".into());
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async move {
        let (health, health_service) = tonic_health::server::health_reporter();
        health
            .set_serving::<grpc_echo::EchoServer<grpc_echo::Echo>>()
            .await;
        let echo = grpc_echo::EchoServer::new(grpc_echo::Echo { name });
        let addr: std::net::SocketAddr = address.parse()?;
        tonic::transport::Server::builder()
            .add_service(health_service)
            .add_service(echo)
            .serve(addr)
            .await?;
        Ok(())
    })
}
