"""Efficiency accounting: analytic FLOPs and KV cache (flops.py), measurement (profile.py)."""
