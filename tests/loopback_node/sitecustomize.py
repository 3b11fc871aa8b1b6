"""Loaded by every Python process of a second test Ray node (``tests.harness.ray_node`` puts this
folder on its PYTHONPATH): Ray swaps the addresses 127.0.0.1/localhost for the machine's network
address whenever multi-node mode is on, and the test cluster must stay on the loopback. The swap
is turned off here, for that node's processes only; Ray is otherwise unchanged."""

import os

if os.environ.get("DKD_LOOPBACK_NODE") == "1":
    import ray._private.services as _services

    _services.resolve_ip_for_localhost = lambda host: host
