"""The known harmless third-party warnings are silenced by message; other warnings still print."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

SCRIPT = """
import warnings
import gill  # installs the filters
import torch
from transformers.utils import import_utils
from transformers.utils.generic import logger as generic_logger

layer = torch.nn.TransformerEncoderLayer(8, 2, norm_first=True, batch_first=True)
torch.nn.TransformerEncoder(layer, 2)
import_utils.logger.warning(
    "`SiglipImageProcessor` requires torchvision (not installed); falling back to `SiglipImageProcessorPil` "
    "for backward compatibility.")
generic_logger.warning("`past_key_values`/`cache_params` are deprecated. Use `cache` instead.")
generic_logger.warning("a real transformers warning")
warnings.warn("a real user warning")
"""


def test_known_warnings_are_silenced_and_others_kept():
    proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    err = proc.stderr
    assert "enable_nested_tensor" not in err and "requires torchvision" not in err
    assert "past_key_values" not in err
    assert "a real transformers warning" in err and "a real user warning" in err
