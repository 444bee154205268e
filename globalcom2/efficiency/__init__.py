"""Efficiency accounting: analytic FLOPs and KV cache (``flops``), measurement of latency, throughput and
peak memory (``profile``)."""
