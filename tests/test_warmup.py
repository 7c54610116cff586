"""The background import that takes torch.func's one-time import off a run's critical path."""

from __future__ import annotations

import subprocess
import sys

from flowtame.engine.warmup import TORCH_FUNC_IMPORT, BackgroundImport


def test_background_import_loads_the_module_before_join_returns() -> None:
    code = (
        "import sys\n"
        "from flowtame.engine.warmup import BackgroundImport\n"
        f"preloaded = {TORCH_FUNC_IMPORT!r} in sys.modules  # (a torch that imports it with itself)\n"
        "pending = BackgroundImport()\n"
        "assert (pending._thread is None) == preloaded\n"
        "pending.join()\n"
        f"assert {TORCH_FUNC_IMPORT!r} in sys.modules\n"
        f"assert not getattr(sys.modules[{TORCH_FUNC_IMPORT!r}].__spec__, '_initializing', False)\n"
        "pending.join()  # (a second join returns at once)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_a_module_already_imported_starts_no_thread() -> None:
    pending = BackgroundImport("json")
    assert pending._thread is None
    pending.join()


def test_a_failed_import_is_left_to_the_main_thread() -> None:
    pending = BackgroundImport("flowtame_no_such_module")
    pending.join()
    assert "flowtame_no_such_module" not in sys.modules
