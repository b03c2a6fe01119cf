"""Building and loading the native C++ kernels of ``csrc/`` (one extension per op).

An extension is compiled with ninja through ``torch.utils.cpp_extension`` the first time it is
really used (a kernel call, or ``backend="auto"`` choosing it) and cached under
``TORCH_EXTENSIONS_DIR`` (default ``~/.cache/torch_extensions``), under a name that carries a
digest of the sources (one build per version of the kernels); later processes load the cached
build in milliseconds. ``is_available()`` never builds: it says whether the extension is loaded,
or could be (its source is there and ninja and a C++ compiler are on the machine).
``TCOD_FAST_DISABLE_NATIVE=1`` makes ``backend="auto"`` skip the native kernels. A build says so
on stderr: one line when it starts, one when it ends (with the cache folder), so a first call
never sits silent while the compiler runs.

Instruction sets: every extension is built for the architecture's baseline and holds several
copies of its kernels (on x86-64: portable, AVX2 + FMA + F16C, AVX-512, and the AVX-512 logic on
AVX2 for testing; ``csrc/cpu_isa.h``), each a translation unit of its own, so ninja compiles them
in parallel. The best copy the CPU runs is chosen when the extension loads;
``TCOD_FAST_NATIVE_ISA=portable|avx2|avx512`` (or ``avx2x16``, or ``auto``, the default) forces
one, and a value the CPU cannot run is an error. One cached build serves every CPU of the
architecture.

The sources live in ``csrc/`` at the repository root, beside the package rather than inside it,
as C++ sources usually are; a wheel carries a copy as ``tcod_fast/_csrc`` (``setup.py``), which
is looked up first.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import platform
import shlex
import shutil
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

DISABLE_ENV = "TCOD_FAST_DISABLE_NATIVE"
ISA_ENV = "TCOD_FAST_NATIVE_ISA"
ISA_CHOICES = ("auto", "portable", "avx2", "avx512", "avx2x16")
COPIES = ("portable", "avx2x16", "avx2", "avx512")  # one translation unit each (csrc/cpu_isa.h)


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


def build_tag() -> str:
    """The build targets the architecture's baseline, so one cache serves every CPU of it."""
    return hashlib.sha1(platform.machine().encode()).hexdigest()[:10]


def build_flags() -> list[str]:
    """The compiler flags of every native extension. ``-ffp-contract=fast`` lets the vector
    polynomials use FMA in the copies whose target has it (ISO C++ mode turns contraction off);
    ``-Wno-psabi``: the 16-lane copies pass vectors between inlined helpers, which GCC warns about
    where the baseline target has no 64-byte registers."""
    flags = ["-O3", "-std=c++17", "-fopenmp", "-fno-math-errno", "-fno-trapping-math", "-ffp-contract=fast",
             "-Wno-psabi"]
    if platform.machine() in ("x86_64", "AMD64"):
        # baseline x86-64: the other copies are compiled with target pragmas and chosen at run time
        flags += ["-march=x86-64", "-mtune=generic"]
    return flags


def apply_isa_env(module) -> None:
    """Force the copy ``TCOD_FAST_NATIVE_ISA`` names (nothing for ``auto`` or unset)."""
    requested = os.environ.get(ISA_ENV, "auto").strip().lower() or "auto"
    if requested not in ISA_CHOICES:
        raise RuntimeError(f"{ISA_ENV} must be one of {ISA_CHOICES}, got {requested!r}")
    if requested == "auto":
        return
    supported = list(module.supported_isas())
    if requested not in supported:
        raise RuntimeError(f"{ISA_ENV}={requested} but this CPU runs only {supported}")
    module.set_isa(requested)


def _build_directory(name: str) -> Path:
    from torch.utils import cpp_extension

    return Path(cpp_extension._get_build_directory(name, verbose=False))


def _say(line: str) -> None:
    print(f"tcod_fast: {line}", file=sys.stderr, flush=True)


class NativeExtension:
    """One C++ extension: built on first use, loaded once per process, thread-safe.

    Subclasses name the main source file (``source_name``: the Python bindings and the choice of
    copy; its copies are ``<stem>_<copy>.cpp`` beside it), how the build is named
    (``build_name``) and what to do once it is loaded (``after_load``; by default, apply
    ``TCOD_FAST_NATIVE_ISA``). A failed build is remembered: later calls raise the same error
    without compiling again.
    """

    source_name: str = ""
    label: str = ""  # "" or e.g. "top-k ", as messages name the kernel

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._module = None
        self._error: str | None = None
        self._warned = False

    # ---- what subclasses define ----
    def build_name(self) -> str:
        raise NotImplementedError

    def cflags(self) -> list[str]:
        return build_flags()

    def after_load(self, module) -> None:
        """Called once with the freshly loaded module; a ``RuntimeError`` here fails the load."""
        apply_isa_env(module)

    # ---- loading ----
    def source(self) -> Path:
        return source_dir() / self.source_name

    def sources(self) -> list[Path]:
        """The main source and one translation unit per instruction-set copy."""
        main = self.source()
        return [main, *(main.with_name(f"{main.stem}_{copy}.cpp") for copy in COPIES)]

    def load(self, verbose: bool = False):
        """Build (first time) and import the extension. Raises ``RuntimeError`` on failure."""
        with self._lock:
            if self._module is not None:
                return self._module
            if self._error is not None:
                raise RuntimeError(self._error)
            from torch.utils import cpp_extension

            sources = self.sources()
            missing = [path for path in sources if not path.is_file()]
            if missing:
                self._error = f"native {self.label}kernel source not found at {missing[0]}"
                raise RuntimeError(self._error)
            name = f"{self.build_name()}_{self.source_digest()}"
            try:
                build_dir = _build_directory(name)
                fresh = not (build_dir / f"{name}.so").is_file()
                if fresh:
                    _say(f"compiling the native {self.label}CPU kernels (first use of this version; about a minute "
                         f"on two cores) into {build_dir}")
                started = time.perf_counter()
                module = cpp_extension.load(
                    name=name,
                    sources=[str(path) for path in sources],
                    extra_cflags=self.cflags(),
                    extra_ldflags=["-fopenmp"],
                    build_directory=str(build_dir),
                    verbose=verbose,
                )
            except Exception as exc:  # compiler missing, headers missing, ...
                self._error = f"building the native {self.label}CPU kernel failed: {type(exc).__name__}: {exc}"
                raise RuntimeError(self._error) from exc
            if fresh:
                _say(f"built the native {self.label}CPU kernels in {time.perf_counter() - started:.0f} s; "
                     f"cached in {build_dir}")
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
        for path in (*self.sources(), *sorted(source.parent.glob("*.h"))):
            digest.update(path.name.encode())
            digest.update(path.read_bytes())
        return digest.hexdigest()[:10]

    def is_loaded(self) -> bool:
        return self._module is not None

    # ---- the instruction-set copies ----
    def isa(self) -> str:
        """The copy of the kernels that runs: ``"avx512"``, ``"avx2"``, ``"avx2x16"`` or ``"portable"``."""
        return self.load().isa()

    def available_isas(self) -> list[str]:
        """The instruction sets this CPU can run the kernels with (best last)."""
        return list(self.load().supported_isas())

    @contextlib.contextmanager
    def use_isa(self, name: str) -> Iterator[None]:
        """Run the kernels with instruction set ``name`` inside the block (tests, benchmarks)."""
        module = self.load()
        previous = module.isa()
        module.set_isa(name)
        try:
            yield
        finally:
            module.set_isa(previous)

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
        return all(path.is_file() for path in self.sources()) and toolchain_present()

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
