//! Sluice data plane.
