"""The edge's proxy benchmark, one part a module; bench/proxy_bench.py runs it (docs/benchmarks.md)."""
