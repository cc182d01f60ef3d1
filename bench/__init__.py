"""Benchmark harness: every figure is a ratio against a raw baseline run in the same
process and the same run (the machine is shared and noisy, absolute numbers drift).

    python -m bench.run [--scenarios writer,reader,latency,throttle] [--repeat 3]
                        [--json out.json] [--quick]

Scenarios (one module each): `writer`, `reader`, `latency`, `throttle`. The bench
lives beside the package, not inside it: it is not shipped in the wheel.
"""
