"""The package surface: `import titans` stays light, and the lazily loaded names work."""

from __future__ import annotations

import subprocess
import sys


def test_import_titans_does_not_load_training():
    code = ("import sys, titans\n"
            "assert 'titans.train' not in sys.modules, 'titans.train loaded at import'\n"
            "assert 'torch.distributed.checkpoint' not in sys.modules\n"
            "assert 'Trainer' in dir(titans)\n"
            "from titans import Trainer, TrainConfig, load_checkpoint, CheckpointError\n"
            "assert 'titans.train' in sys.modules\n"
            "try:\n    titans.no_such_name\nexcept AttributeError as e:\n    assert 'no_such_name' in str(e)\n"
            "else:\n    raise SystemExit('no AttributeError')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
