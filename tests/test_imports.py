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
