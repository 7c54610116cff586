"""Torch's one-time costs, paid beside the run's setup instead of in front of its first step.

torch.func's gradient transforms (``grad``, ``vjp``, ``vmap(grad)``) import ``torch._dynamo`` on their first call,
to switch compiled autograd off around their backward: 0.7-0.9 s of Python on one core (torch 2.13), paid once per
process by every run whose first per-image gradient comes before anything else imported it. (Loading a Glow with
LU 1x1 convolutions imports it already: ``torch.triu`` on the meta device goes through torch's reference ops.)
:class:`BackgroundImport` runs such an import on a background thread while the main thread's setup passes sit in
torch's kernels, which release the GIL; :meth:`BackgroundImport.join` waits for it before the first transform, so
the two threads never import the same modules at once. The thread is not a daemon: a run that ends early (an
input error, Ctrl-C) waits for the import to finish at exit instead of tearing it down halfway.
"""

from __future__ import annotations

import contextlib
import importlib
import sys
import threading

__all__ = ["TORCH_FUNC_IMPORT", "BackgroundImport"]

#: The module torch.func's gradient transforms import on their first call.
TORCH_FUNC_IMPORT = "torch._dynamo"


class BackgroundImport:
    """Import ``module`` on a background thread (nothing when it is imported already); :meth:`join` waits for it.

    A failed import is left to the main thread: its own import of the module raises the error there."""

    def __init__(self, module: str = TORCH_FUNC_IMPORT):
        self._thread: threading.Thread | None = None
        if module not in sys.modules:
            self._thread = threading.Thread(target=self._run, args=(module,), name=f"import {module}")
            self._thread.start()

    @staticmethod
    def _run(module: str) -> None:
        with contextlib.suppress(Exception):
            importlib.import_module(module)

    def join(self) -> None:
        """Wait until the import has finished (at once when there was none)."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
