"""Guard rails: the library imports neither click nor tqdm and never prints."""

import subprocess
import sys


def test_import_monoquant_needs_neither_click_nor_tqdm():
    # torch itself may import tqdm (torch.hub); block both outright so any import by monoquant fails
    code = (
        "import sys; sys.modules['click'] = None; sys.modules['tqdm'] = None\n"
        "import torch, monoquant\n"
        "q = monoquant.quantize({'a.weight': torch.randn(8, 128)}, 'int4')\n"
        "monoquant.dequantize(q)\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout == "ok\n"  # and nothing else was printed


def test_no_numpy_warning_without_numpy():
    # a clean install has no numpy (not a dependency): torch then warns "Failed to initialize
    # NumPy" at import; monoquant silences exactly that warning (with numpy blocked, the bare
    # `import torch` control prints it, so this test can fail)
    block = "import sys; sys.modules['numpy'] = None\n"
    control = subprocess.run(
        [sys.executable, "-W", "default", "-c", block + "import torch"], capture_output=True, text=True
    )
    assert "Failed to initialize NumPy" in control.stderr
    code = block + (
        "import monoquant, torch\n"
        "q = monoquant.quantize({'a.weight': torch.randn(8, 128)}, 'int4')\n"
        "monoquant.dequantize(q)\n"
    )
    cli = (
        block + "import runpy; sys.argv = ['monoquant', '--help']; runpy.run_module('monoquant', "
        "run_name='__main__')"
    )
    for argv in (["-c", code], ["-c", cli]):
        out = subprocess.run([sys.executable, "-W", "default", *argv], capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        assert "NumPy" not in out.stderr, out.stderr
