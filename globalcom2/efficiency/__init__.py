"""Efficiency measurement: latency, throughput and peak memory of generation (``profile``)."""
