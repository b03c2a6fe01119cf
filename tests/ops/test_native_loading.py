"""Loading the native extensions: asking whether they are available compiles nothing, the build
happens on first use, and a build that fails leaves ``backend="auto"`` on the torch backend with
one warning. Each case runs in a fresh Python with its own empty extension cache."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from torch.utils import cpp_extension

from tcod_fast.ops.native_extension import toolchain_present

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _run(script: str, ext_dir, **env) -> list[str]:
    base = {k: v for k, v in os.environ.items() if k != "TCOD_FAST_DISABLE_NATIVE"}
    env = {**base, "TORCH_EXTENSIONS_DIR": str(ext_dir), **env}
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True,
                         timeout=300, env=env, cwd=_ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.split()


_ASK = """
    from tcod_fast.ops.turn_kl import native_backend as logits_native
    from tcod_fast.ops.topk_turn_kl import native_backend as topk_native
    print(logits_native.is_available(), topk_native.is_available())
    print(logits_native._EXTENSION.is_loaded(), topk_native._EXTENSION.is_loaded())
"""


def test_is_available_compiles_nothing(tmp_path):
    ext_dir = tmp_path / "ext"
    expected = str(toolchain_present())
    assert _run(_ASK, ext_dir) == [expected, expected, "False", "False"]
    assert not ext_dir.exists() or not any(ext_dir.iterdir()), "is_available() wrote into the extension cache"


def test_disabled_native_is_not_available(tmp_path):
    assert _run(_ASK, tmp_path / "ext", TCOD_FAST_DISABLE_NATIVE="1") == ["False", "False", "False", "False"]


@pytest.mark.skipif(not cpp_extension.is_ninja_available(), reason="needs ninja to attempt a build")
def test_failed_build_falls_back_to_torch_with_one_warning(tmp_path):
    # `false` is a compiler that exists and fails: is_available() cannot know, the first use finds out
    script = """
        import warnings
        import torch
        from tcod_fast import fused_turn_kl
        from tcod_fast.ops.turn_kl import native_backend

        print(native_backend.is_available())
        student, teacher = torch.randn(3, 40, requires_grad=True), torch.randn(3, 40)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fused = fused_turn_kl(student, teacher)
            again = fused_turn_kl(student, teacher)
        reference = fused_turn_kl(student, teacher, backend="torch")
        print(native_backend.is_available(), native_backend._EXTENSION.is_loaded())
        print(sum("building the native CPU kernel failed" in str(w.message) for w in caught))
        print(bool(torch.equal(fused, reference) and torch.equal(again, reference)))
    """
    lines = _run(script, tmp_path / "ext", CXX="false")
    assert lines == ["True", "False", "False", "1", "True"]


def test_a_build_says_when_it_starts_and_ends(tmp_path, monkeypatch, capsys):
    """One line on stderr when compiling starts, one when it ends, naming the cache folder; nothing
    when the build is already cached. (The compiler is faked: a real build is what the other
    native tests load.)"""
    from tcod_fast.ops import native_extension
    from tcod_fast.ops.turn_kl.native_backend import _TurnKLExtension

    class FakeModule:
        def supported_isas(self):
            return ["portable"]

    def fake_load(name, build_directory, **kwargs):
        (Path(build_directory) / f"{name}.so").write_bytes(b"")
        return FakeModule()

    monkeypatch.setattr(native_extension, "_build_directory", lambda name: tmp_path / name)
    monkeypatch.setattr(cpp_extension, "load", fake_load)
    monkeypatch.delenv("TCOD_FAST_NATIVE_ISA", raising=False)
    extension = _TurnKLExtension()
    (tmp_path / f"{extension.build_name()}_{extension.source_digest()}").mkdir()
    extension.load()
    lines = capsys.readouterr().err.splitlines()
    build_dir = tmp_path / f"{extension.build_name()}_{extension.source_digest()}"
    assert len(lines) == 2, lines
    assert lines[0].startswith("tcod_fast: compiling the native CPU kernels") and str(build_dir) in lines[0]
    assert lines[1].startswith("tcod_fast: built the native CPU kernels in ") and lines[1].endswith(f"cached in {build_dir}")
    _TurnKLExtension().load()  # a later process: the build is cached, nothing is said
    assert capsys.readouterr().err == ""


@pytest.mark.skipif(not cpp_extension.is_ninja_available(), reason="needs ninja to attempt a build")
def test_a_failing_build_says_it_started(tmp_path):
    script = """
        import warnings
        from tcod_fast.ops.turn_kl import native_backend
        warnings.simplefilter("ignore")
        print(native_backend.try_load())
    """
    env = {k: v for k, v in os.environ.items() if k != "TCOD_FAST_DISABLE_NATIVE"}
    env |= {"TORCH_EXTENSIONS_DIR": str(tmp_path / "ext"), "CXX": "false"}
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True,
                         timeout=300, env=env, cwd=_ROOT)
    assert out.stdout.split() == ["False"]
    assert "tcod_fast: compiling the native CPU kernels" in out.stderr
