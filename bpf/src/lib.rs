//! Sluice eBPF fast path.
