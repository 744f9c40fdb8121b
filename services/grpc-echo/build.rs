//! The `test.Echo` service's client and server, generated from the messages in `src/lib.rs`
//! (no `.proto` file, so no `protoc` is needed).

use tonic_build::manual::{Builder, Method, Service};

fn method(name: &str, route: &str) -> tonic_build::manual::MethodBuilder {
    Method::builder()
        .name(name)
        .route_name(route)
        .input_type("crate::Msg")
        .output_type("crate::Msg")
        .codec_path("tonic_prost::ProstCodec")
}

fn main() {
    let echo = Service::builder()
        .name("Echo")
        .package("test")
        .method(method("unary", "Unary").build())
        .method(
            method("server_stream", "ServerStream")
                .server_streaming()
                .build(),
        )
        .method(
            method("client_stream", "ClientStream")
                .client_streaming()
                .build(),
        )
        .method(
            method("bidi", "Bidi")
                .client_streaming()
                .server_streaming()
                .build(),
        )
        .build();
    Builder::new().compile(&[echo]);
}
