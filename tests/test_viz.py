import subprocess
import sys

import numpy as np
from PIL import Image


def test_importing_the_library_leaves_the_users_matplotlib_backend_alone():
    # a user who chose a backend (here svg) keeps it after importing rlr_fast's plotting modules
    code = ("import matplotlib; matplotlib.use('svg'); import rlr_fast.viz, rlr_fast.bench, rlr_fast.cli; "
            "print(matplotlib.get_backend())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().lower() == "svg"


def test_pictures_are_written_without_pyplot(tmp_path):
    code = f"""
import sys, torch
from rlr_fast.viz import save_overlay, save_heatmap
image = torch.rand(3, 32, 48) * 255
mask = torch.zeros(32, 48); mask[8:16, 10:20] = 1
heat = torch.rand(32, 48)
save_overlay({str(tmp_path / 'o.png')!r}, image.to(torch.uint8).permute(1, 2, 0).numpy(), mask, heat, title="t")
save_heatmap({str(tmp_path / 'h.png')!r}, image.to(torch.uint8).permute(1, 2, 0).numpy(), heat)
print('matplotlib.pyplot' in sys.modules)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
    for name in ("o.png", "h.png"):
        png = np.asarray(Image.open(tmp_path / name))
        assert png.ndim == 3 and png.shape[0] > 100 and png.shape[1] > 100
        assert png[..., :3].std() > 10  # drawn, not blank
