"""`experiments.machine`: what a report says about the machine, without loading what it names."""

from __future__ import annotations

import subprocess
import sys


def test_describe_names_torch_and_transformers_versions_without_importing_them():
    code = ("import importlib.metadata, sys; from gqa_t5x.experiments import machine; d = machine.describe(); "
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'imported'; "
            "assert d['torch'] == importlib.metadata.version('torch'), d; "
            "assert d['transformers'] == importlib.metadata.version('transformers'), d; "
            "assert 'torch_threads' not in d and d['cores'] >= 1 and d['backend'] == 'cpu'; "
            "import torch; assert machine.describe()['torch_threads'] == torch.get_num_threads()")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            env={"JAX_PLATFORMS": "cpu", **__import__("os").environ})
    assert result.returncode == 0, result.stderr[-2000:]
