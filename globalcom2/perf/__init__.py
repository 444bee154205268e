"""Speed and memory benchmarks of the harness's own code, run by ``make bench-*`` targets (never by the
test suite): ``python -m globalcom2.perf.<name>``. The evaluation benchmarks (VQAv2, GQA, ...) are
:mod:`globalcom2.data.benchmarks`."""
