"""The Sluice vs Envoy load-test harness; the entry point is benches/loadtest.py."""
