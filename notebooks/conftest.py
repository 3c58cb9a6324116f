"""pytest plugin for the notebook runs (nbval): kernels talk over Unix sockets, and a kernel that
dies while starting is started again, with its last words in the error.

Why: `make test` runs two nbval chains at the same time. Over TCP, jupyter_client picks each kernel's
five ports by binding a free port and releasing it; the kernel binds it again a second later, and
in between a process of the other chain can take it. The kernel then dies at once and nbval reports
"Kernel died before replying to kernel_info" for every cell of the notebook (jupyter_client issue
487; it failed CI once, on notebook 01). IPC sockets are files named after a directory of this
process, so two chains cannot collide. nbval sends a kernel's stderr to /dev/null; here it goes to a
temporary file whose tail is quoted if the kernel still dies `START_ATTEMPTS` times in a row.
Kernels get `strokekit.runner.KERNEL_ARGS`, as under `make run`: output written to the process's
file descriptors (TensorFlow's absl start-up lines) goes to that file, not into the notebook.

Nothing changes for a student running a notebook in Jupyter: this is loaded only by pytest, for the
notebooks in this folder.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid

START_ATTEMPTS = 3
_IPC_DIR: str | None = None


def start_new_kernel(startup_timeout=60, kernel_name="python", **kwargs):
    """What `nbval.kernel.start_new_kernel` does, over IPC, with retries and a kept stderr."""
    from jupyter_client.manager import KernelManager
    from nbval.kernel import NbvalKernelspecManager

    from strokekit.runner import KERNEL_ARGS

    kwargs.pop("stderr", None)  # nbval's /dev/null: replaced by a file we can quote
    kwargs.setdefault("extra_arguments", list(KERNEL_ARGS))
    failures = []
    for attempt in range(1, START_ATTEMPTS + 1):
        # Not a `with`: the kernel writes here for as long as it runs, after this returns.
        stderr = tempfile.TemporaryFile(mode="w+", prefix="nbval-kernel-", suffix=".err")  # noqa: SIM115
        km = KernelManager(
            kernel_name=kernel_name,
            kernel_spec_manager=NbvalKernelspecManager(),
            transport="ipc",
            ip=os.path.join(ipc_dir(), uuid.uuid4().hex[:12]),
        )
        km.start_kernel(stderr=stderr, **kwargs)
        kc = km.client()
        kc.start_channels()
        try:
            kc.wait_for_ready(timeout=startup_timeout)
        except RuntimeError as exc:
            kc.stop_channels()
            km.shutdown_kernel(now=True)
            stderr.seek(0)
            tail = stderr.read()[-1500:].strip() or "(nothing)"
            stderr.close()
            failures.append(f"attempt {attempt}: {exc}; kernel stderr:\n{tail}")
            continue
        stderr.close()  # the kernel keeps its own descriptor of the (already unlinked) file
        return km, kc
    raise RuntimeError(
        f"kernel {kernel_name!r} did not start in {START_ATTEMPTS} attempts:\n" + "\n".join(failures)
    )


def ipc_dir() -> str:
    """A short private folder for this process's kernel sockets (a Unix socket path has ~100 bytes)."""
    global _IPC_DIR
    if _IPC_DIR is None:
        _IPC_DIR = tempfile.mkdtemp(prefix="sk-nbval-", dir="/tmp" if os.path.isdir("/tmp") else None)
    return _IPC_DIR


def pytest_configure(config):
    try:
        import nbval.kernel
    except ImportError:  # nbval not installed: nothing to patch
        return
    if os.name == "posix" and hasattr(nbval.kernel, "start_new_kernel"):
        nbval.kernel.start_new_kernel = start_new_kernel


def pytest_unconfigure(config):
    global _IPC_DIR
    if _IPC_DIR is not None:
        shutil.rmtree(_IPC_DIR, ignore_errors=True)
        _IPC_DIR = None
