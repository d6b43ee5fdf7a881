//! The HTTP connection manager and the request path behind it.

pub mod conn_manager;
pub mod ctx;
pub mod forward;
pub mod grpc_web;
pub mod header_names;
pub mod local_reply;
pub mod replay;
pub mod retry;
pub mod router;
pub mod server;
pub mod stack;
pub mod stream_timers;
pub mod upgrade;
