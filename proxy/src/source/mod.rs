//! Configuration sources: where documents come from.

pub mod file;
pub mod kubernetes;
