"""edgeq's device side: everything that runs on a device, shipped as one zipapp (``edgeq-device-<sha12>.pyz``).

This package imports nothing from the rest of edgeq and uses only relative imports among its own modules,
so the zipapp carries it as a top-level package of its own. Standard library only at import time; numpy
and the runtimes are imported by the bench modules when a run needs them. Python 3.8+ (checked with
vermin in the test suite).

    protocol.py        ``python -I edgeq-device.pyz OP``: JSON params on stdin, one JSON line on stdout
    ops/               releases (lock, inspect, prepare, activate, rollback), venv, facts, runs
    bench/             the ``run`` op: request -> result; timing, memory, eval data
    runtimes/<fmt>.py  one module per artifact format (host validation imports these too)
    power/<sensor>.py  one module per power sensor
    env.py             the environment fingerprint of a run
    watchdog.py        stop a run whose controller is gone
"""

# Reported by ``selfcheck`` and in every result as ``runner_version``.
DEVICE_VERSION = "2"
