"""The one base class of errors in what the user gave (files, arguments, config values, model
references, arrays): every entry point turns them into one line on stderr and exit status 2,
and training never retries them (retries are for lost workers and nodes).

Each subclass keeps its own name and its message names the file, key or row. They pickle with
their class and message intact (Ray re-raises a worker's exception on the driver), which an
``__init__`` with extra required arguments would break: ``__reduce__`` passes them back.
"""

from __future__ import annotations


class InputError(Exception):
    """Bad input: fails at once, with its message, never retried."""


EXIT_BAD_INPUT = 2  # argparse's status for a bad argument; ours for every bad input
