"""Benchmarks: each prints README table rows with ratios against a peer measured in the same run."""
