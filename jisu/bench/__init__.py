"""Benchmarks that ship with jisu: `jisu bench latency | serve | compare` (see each module's docstring).

jisu.bench.metrics holds the vLLM `bench serve` metric definitions as pure functions; jisu.bench.prompts
the synthetic and real prompts the benchmarks send.
"""
