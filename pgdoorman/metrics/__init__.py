"""Counters, latency histograms, the Prometheus and health endpoints."""
