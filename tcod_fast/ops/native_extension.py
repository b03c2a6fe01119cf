"""Building and loading the native C++ kernels of ``csrc/`` (one extension per op).

An extension is compiled with ninja through ``torch.utils.cpp_extension`` the first time it is
really used (a kernel call, or ``backend="auto"`` choosing it) and cached under
``TORCH_EXTENSIONS_DIR`` (default ``~/.cache/torch_extensions``), under a name that carries a
digest of the sources (one build per version of the kernels); later processes load the cached
build in milliseconds. ``is_available()`` never builds: it says whether the extension is loaded,
or could be (its source is there and ninja and a C++ compiler are on the machine).
``TCOD_FAST_DISABLE_NATIVE=1`` makes ``backend="auto"`` skip the native kernels.

The sources live in ``csrc/`` at the repository root, beside the package rather than inside it,
as C++ sources usually are; a wheel carries a copy as ``tcod_fast/_csrc`` (``setup.py``), which
is looked up first.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shlex
import shutil
import threading
import warnings
from pathlib import Path

DISABLE_ENV = "TCOD_FAST_DISABLE_NATIVE"


def source_dir() -> Path:
    """``tcod_fast/_csrc`` in an installed wheel, else ``csrc/`` of the source tree."""
    installed = Path(__file__).resolve().parents[1] / "_csrc"
    if installed.is_dir():
        return installed
    return Path(__file__).resolve().parents[2] / "csrc"


def toolchain_present() -> bool:
    """ninja and the C++ compiler ``torch.utils.cpp_extension`` would call (``$CXX``, else ``c++``)."""
    return _toolchain_present(os.environ.get("CXX", "c++") or "c++")


@functools.lru_cache(maxsize=None)
def _toolchain_present(cxx: str) -> bool:  # cached: asking ninja for its version starts a process
    from torch.utils import cpp_extension

    compiler = shlex.split(cxx)
    return bool(compiler) and shutil.which(compiler[0]) is not None and cpp_extension.is_ninja_available()


def disabled() -> bool:
    return os.environ.get(DISABLE_ENV) == "1"


class NativeExtension:
    """One C++ extension: built on first use, loaded once per process, thread-safe.

    Subclasses name the source file and say how it is built (``build_name``, ``cflags``) and what
    to do once it is loaded (``after_load``). A failed build is remembered: later calls raise the
    same error without compiling again.
    """

    source_name: str = ""
    label: str = ""  # "" or e.g. "top-k ", as error messages name the kernel

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._module = None
        self._error: str | None = None
        self._warned = False

    # ---- what subclasses define ----
    def build_name(self) -> str:
        raise NotImplementedError

    def cflags(self) -> list[str]:
        raise NotImplementedError

    def after_load(self, module) -> None:
        """Called once with the freshly loaded module; a ``RuntimeError`` here fails the load."""

    # ---- loading ----
    def source(self) -> Path:
        return source_dir() / self.source_name

    def load(self, verbose: bool = False):
        """Build (first time) and import the extension. Raises ``RuntimeError`` on failure."""
        with self._lock:
            if self._module is not None:
                return self._module
            if self._error is not None:
                raise RuntimeError(self._error)
            from torch.utils import cpp_extension

            source = self.source()
            if not source.is_file():
                self._error = f"native {self.label}kernel source not found at {source}"
                raise RuntimeError(self._error)
            try:
                module = cpp_extension.load(
                    name=f"{self.build_name()}_{self.source_digest()}",
                    sources=[str(source)],
                    extra_cflags=self.cflags(),
                    extra_ldflags=["-fopenmp"],
                    verbose=verbose,
                )
            except Exception as exc:  # compiler missing, headers missing, ...
                self._error = f"building the native {self.label}CPU kernel failed: {type(exc).__name__}: {exc}"
                raise RuntimeError(self._error) from exc
            try:
                self.after_load(module)
            except RuntimeError as exc:
                self._error = str(exc)
                raise
            self._module = module
            return module

    def source_digest(self) -> str:
        """A digest of the source and the headers beside it, part of the build's name: one build
        per version of the kernels, so checkouts of different versions that share
        ``TORCH_EXTENSIONS_DIR`` never overwrite, or load, each other's build."""
        digest = hashlib.sha1()
        source = self.source()
        for path in (source, *sorted(source.parent.glob("*.h"))):
            digest.update(path.name.encode())
            digest.update(path.read_bytes())
        return digest.hexdigest()[:10]

    def is_loaded(self) -> bool:
        return self._module is not None

    def is_available(self) -> bool:
        """Whether the extension is loaded or can be loaded; never compiles.

        False when ``TCOD_FAST_DISABLE_NATIVE=1``, after a failed build, when the source is
        missing, or when ninja or the C++ compiler is. True does not promise that a first build
        succeeds: :meth:`try_load` is what finds out.
        """
        if disabled():
            return False
        if self._module is not None:
            return True
        if self._error is not None:
            return False
        return self.source().is_file() and toolchain_present()

    def try_load(self) -> bool:
        """Load the extension, building it on first use; False (with one warning) if that fails.

        What ``backend="auto"`` calls: an op falls back to its torch backend when this is False.
        """
        if disabled():
            return False
        try:
            self.load()
            return True
        except RuntimeError as exc:
            if not self._warned:
                warnings.warn(f"tcod_fast: {exc}; using the torch backend on CPU instead", RuntimeWarning, stacklevel=4)
                self._warned = True
            return False
