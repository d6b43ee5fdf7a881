//! `envoy.filters.http.grpc_web`: gRPC-Web from browsers to gRPC upstream and back.
//! (Pass-through placeholder; the transcoder lands with the gRPC work.)

use tower::Layer;

#[derive(Clone, Default)]
pub struct GrpcWebLayer;

impl<S> Layer<S> for GrpcWebLayer {
    type Service = S;
    fn layer(&self, inner: S) -> S {
        inner
    }
}
