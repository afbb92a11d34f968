"""Built-in benchmarks: one module per data source, each defining ``Benchmark`` objects.

They are registered lazily in ``edgebuild.bench.benchmarks``; importing this package imports
nothing heavy.
"""
