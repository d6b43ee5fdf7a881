//! TLS material for Sluice.
