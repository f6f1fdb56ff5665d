"""The command line (``python -m lowbit``) and the library's output conventions (issue 15, items 6-7).

The CLI runs in-process (``lowbit.__main__.main(argv)``) to keep this file fast. Expected option
lists are read from the scripts' own source (their ``add_argument`` calls), so a --help that hides an
option fails here.
"""

from __future__ import annotations

import ast
import io
import logging
import os
import re
import sys
from pathlib import Path

import pytest
import torch

import lowbit
from lowbit import __main__ as cli
from lowbit import demo

ROOT = Path(__file__).resolve().parents[1]
SOURCE_PACKAGE = ROOT / "python" / "lowbit"


def run_cli(argv, capsys) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of ``python -m lowbit *argv``, run in-process."""
    argv0 = sys.argv[0]
    path = list(sys.path)
    try:
        code = cli.main(list(argv))
    except SystemExit as e:  # argparse's --help / --version / errors
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv[0] = argv0
        sys.path[:] = path
    out, err = capsys.readouterr()
    return code, out, err


def options_in_source(path: Path) -> list[str]:
    """The long options a script declares with ``add_argument("--name", ...)``."""
    return re.findall(r"add_argument\(\s*\"(--[\w-]+)\"", path.read_text())


def test_version(capsys):
    code, out, _ = run_cli(["--version"], capsys)
    assert code == 0
    assert out.startswith(f"lowbit {lowbit.__version__} ") and f"torch {torch.__version__}" in out
    assert "_C" in out  # the modules that were built


def test_top_level_help_names_every_command(capsys):
    code, out, _ = run_cli(["--help"], capsys)
    assert code == 0
    for cmd in ("info", "bench", "gpucheck", "demo", "quantize", "--version"):
        assert cmd in out


def test_demo_help_shows_the_real_options(capsys):
    code, out, _ = run_cli(["demo", "--help"], capsys)
    assert code == 0
    declared = options_in_source(SOURCE_PACKAGE / "demo.py")
    assert {"--formats", "--tokens", "--cache-dir", "--no-cache"} <= set(declared)
    for opt in declared:
        assert opt in out, f"demo --help does not show {opt}"
    assert "517 MB" in out  # says what the cache costs


def test_bench_help_lists_the_families(capsys):
    code, out, _ = run_cli(["bench", "--help"], capsys)
    assert code == 0
    families = sorted(p.stem[len("bench_"):] for p in (ROOT / "bench").glob("bench_*.py"))
    assert families and f"families: {', '.join(families)}" in out


def test_bench_family_help_shows_its_options(capsys):
    code, out, _ = run_cli(["bench", "quant", "--help"], capsys)
    assert code == 0
    assert "python -m lowbit bench quant" in out  # the script's usage line carries the real command
    declared = options_in_source(ROOT / "bench" / "bench_quant.py")
    assert declared
    for opt in declared:
        assert opt in out


def test_bench_unknown_family(capsys):
    code, _, err = run_cli(["bench", "no_such_family"], capsys)
    assert code == 2 and "unknown family 'no_such_family'" in err


def test_bench_scripts_are_found_outside_a_checkout(tmp_path, monkeypatch, capsys):
    """From a directory that is not a checkout, the bench scripts come from the package (the wheel
    ships them as lowbit/bench) or, for a PYTHONPATH=python run, from the tree lowbit was imported from."""
    monkeypatch.chdir(tmp_path)
    path = cli._find_script("bench_gemm")
    assert path is not None and os.path.exists(path)
    code, out, _ = run_cli(["bench", "--help"], capsys)
    assert "gemm" in out


def test_quantize_missing_file_is_a_message_not_a_traceback(tmp_path, capsys):
    missing = tmp_path / "nope.safetensors"
    code, out, err = run_cli(["quantize", str(missing), str(tmp_path / "out.safetensors")], capsys)
    assert code == 2
    assert str(missing) in err and "does not exist" in err and "Traceback" not in err + out
    assert not (tmp_path / "out.safetensors").exists()


def test_quantize_unreadable_file(tmp_path, capsys):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    code, _, err = run_cli(["quantize", str(bad), str(tmp_path / "out.safetensors")], capsys)
    assert code == 2 and "cannot read" in err and str(bad) in err


def test_quantize_writes_what_lowbit_quantize_gives(tmp_path, capsys):
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(8, 128, generator=g), torch.randn(8, generator=g)
    src, dst = tmp_path / "in.safetensors", tmp_path / "out.safetensors"
    lowbit.save_tensors({"w": w, "b": b}, str(src))
    code, out, _ = run_cli(["quantize", str(src), str(dst), "--fmt", "int4", "--block-size", "32"], capsys)
    assert code == 0 and "1 tensors quantized" in out
    got = lowbit.load_tensors(str(dst))
    assert got["w"].equal(lowbit.quantize(w, "int4", block_size=32))
    assert torch.equal(got["b"], b)


FAKE_KERNELS = [
    {"arch": "sm_80", "registers": 40, "spill_stores": 0, "spill_loads": 0, "stack": 0, "smem": 1024,
     "kernel": "fake_gemv_kernel<4>"},
    {"arch": "sm_90", "registers": 96, "spill_stores": 8, "spill_loads": 8, "stack": 16, "smem": 0,
     "kernel": "fake_gemm_kernel<128>"},
]


def test_info_is_short_unless_kernels_are_asked_for(monkeypatch, capsys):
    real = lowbit.info()
    monkeypatch.setattr(lowbit, "info", lambda: dict(real, cuda_kernels=[dict(k) for k in FAKE_KERNELS]))
    code, short, _ = run_cli(["info"], capsys)
    assert code == 0
    assert "fake_gemv_kernel" not in short and "2 kernel x arch entries" in short and "1 spilling" in short
    assert "--kernels" in short  # says how to get the table
    assert len(short.splitlines()) <= 15
    code, full, _ = run_cli(["info", "--kernels"], capsys)
    assert code == 0 and "fake_gemv_kernel<4>" in full and "fake_gemm_kernel<128>" in full
    assert full.startswith(short.splitlines()[0])
    code, js, _ = run_cli(["info", "--json"], capsys)
    assert code == 0 and "fake_gemm_kernel<128>" in js


def test_demo_cache_dir_honours_xdg_cache_home(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert demo.default_cache_dir() == os.path.join(str(tmp_path / "xdg"), "lowbit", "smollm2")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for unset in (lambda: monkeypatch.delenv("XDG_CACHE_HOME"), lambda: monkeypatch.setenv("XDG_CACHE_HOME", "")):
        unset()  # unset or empty: the XDG default ~/.cache
        assert demo.default_cache_dir() == os.path.join(str(tmp_path / "home"), ".cache", "lowbit", "smollm2")


# ----------------------------------------------------------------------------- output conventions
CLI_MODULES = {"__main__.py", "demo.py"}  # command-line front ends: their output is the product


def _print_calls(path: Path) -> list[int]:
    tree = ast.parse(path.read_text(), str(path))
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            if isinstance(f, ast.Name) and f.id == "print":
                lines.append(node.lineno)
            elif (isinstance(f, ast.Attribute) and f.attr == "write" and isinstance(f.value, ast.Attribute)
                  and f.value.attr in ("stdout", "stderr")):
                lines.append(node.lineno)
    return lines


def test_library_modules_log_instead_of_printing():
    """Library code reports through logging (and progress through tqdm), never print / sys.std*.write:
    a user embedding lowbit decides what shows."""
    offenders = {}
    for f in sorted(SOURCE_PACKAGE.rglob("*.py")):
        if f.relative_to(SOURCE_PACKAGE).as_posix() in CLI_MODULES:
            continue
        if lines := _print_calls(f):
            offenders[f.relative_to(SOURCE_PACKAGE).as_posix()] = lines
    assert not offenders, f"print / sys.std*.write in library modules (use logging): {offenders}"


def test_the_print_check_sees_prints(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("import sys\ndef g():\n    print('x')\n    sys.stderr.write('y')\n")
    assert _print_calls(f) == [3, 4]


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def _tiny_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 64))


def test_progress_bar_only_on_a_terminal(monkeypatch, caplog):
    with caplog.at_level(logging.INFO, logger="lowbit"):
        pipe = io.StringIO()  # not a terminal: nothing drawn
        monkeypatch.setattr(sys, "stderr", pipe)
        lowbit.quantize_model(_tiny_model(), "nf4", 32, skip=(), progress=True)
        assert pipe.getvalue() == ""
        tty = _Terminal()
        monkeypatch.setattr(sys, "stderr", tty)
        lowbit.quantize_model(_tiny_model(), "nf4", 32, skip=(), progress=False)  # disabled: nothing
        assert tty.getvalue() == ""
        lowbit.quantize_model(_tiny_model(), "nf4", 32, skip=(), progress=True)
        assert "quantize_model nf4" in tty.getvalue() and "2/2" in tty.getvalue()
    summaries = [r for r in caplog.records if r.name == "lowbit.model" and "quantize_model: 2 Linear" in r.getMessage()]
    assert len(summaries) == 3  # the summary goes to logging every time, whatever progress says


# ----------------------------------------------------------------------------- README snippet
def _readme_block(heading: str) -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split(heading, 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.mark.real_model
def test_readme_models_snippet_runs_offline(smollm2, tmp_path, monkeypatch):
    """The README's "Models" snippet, run as written (in a scratch directory), on the real model."""
    code = _readme_block("## Models")
    assert "load_smollm2" in code and "..." not in code.replace("...)", "")
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(code, "README.md#models", "exec"), scope)
    assert os.path.exists(tmp_path / "adapter" / "adapter_model.safetensors")
    assert scope["report"]["replaced"] and torch.isfinite(scope["loss"])
