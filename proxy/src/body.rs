//! The body type that flows through the request path in both directions.
//!
//! One boxed type keeps the tower layers simple: hyper's `Incoming` (streamed, with
//! backpressure), fixed local replies, replayable buffered bodies for retries, and gRPC-Web
//! transcoders all fit behind it. The box costs one allocation per body.

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full, combinators::BoxBody};

/// Errors inside bodies are boxed: they come from hyper, h2, timeouts and transcoders.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

pub type Body = BoxBody<Bytes, BoxError>;

pub fn empty() -> Body {
    Empty::<Bytes>::new().map_err(|never| match never {}).boxed()
}

pub fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).map_err(|never| match never {}).boxed()
}

/// Boxes any body whose error converts into [`BoxError`].
pub fn boxed<B>(b: B) -> Body
where
    B: http_body::Body<Data = Bytes> + Send + Sync + 'static,
    B::Error: Into<BoxError>,
{
    b.map_err(Into::into).boxed()
}
