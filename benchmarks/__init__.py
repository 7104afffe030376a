"""Speed benchmarks, measured side by side: `python -m benchmarks [--quick] [--only R1,...]`.

Not part of the test suite or CI; see benchmarks/README.md for what each one measures and the last results.
"""
