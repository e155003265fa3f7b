"""The kernel ops three ways, by name, for the kernel tests: ``dispatch.<name>`` (the op under the backend
in force), ``fast.<name>`` (the fast CPU kernel forced: raises where it cannot run, never falls back) and
``reference.<name>`` (the pure-torch oracle of the method that owns the kernel)."""

from __future__ import annotations

import kvpack  # noqa: F401  (registers every method's kernels)
from kvpack import kernels


class _Namespace:
    def __init__(self, wrap):
        self._wrap = wrap

    def __getattr__(self, name: str):
        try:
            kernel = kernels.registered()[name]
        except KeyError:
            raise AttributeError(name) from None
        return self._wrap(kernel)


def _forced(kernel):
    def run(*args):
        with kernels.use("fast"):
            return kernel(*args)

    return run


dispatch = _Namespace(lambda kernel: kernel)
fast = _Namespace(_forced)
reference = _Namespace(lambda kernel: kernel.reference)
