//! `grpc-echo [ADDRESS] [NAME]`: serves `test.Echo` and the health service in the clear (h2c)
//! on ADDRESS (default `127.0.0.1:50051`) until stopped.
//! `grpc-echo call URL`: one unary call to `URL` (`http://HOST:PORT`); prints the answering
//! replica, fails unless the call succeeds.

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let runtime = tokio::runtime::Runtime::new()?;
    if args.first().map(String::as_str) == Some("call") {
        let url = args.get(1).cloned().unwrap_or_default();
        return runtime.block_on(call(url));
    }
    let address = args
        .first()
        .cloned()
        .unwrap_or_else(|| "127.0.0.1:50051".into());
    let name = args.get(1).cloned().unwrap_or_else(|| "grpc-echo".into());
    runtime.block_on(serve(address, name))
}

async fn serve(address: String, name: String) -> anyhow::Result<()> {
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
}

async fn call(url: String) -> anyhow::Result<()> {
    let mut client = grpc_echo::EchoClient::connect(url).await?;
    let msg = grpc_echo::Msg {
        text: "ping".into(),
        ..Default::default()
    };
    let answer = client.unary(msg).await?.into_inner();
    anyhow::ensure!(answer.text == "ping", "wrong answer: {answer:?}");
    println!("ok {}", answer.replica);
    Ok(())
}
