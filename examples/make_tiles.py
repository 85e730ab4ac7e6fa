"""Write synthetic 256x256 H&E-coloured tiles (pink stroma, purple nuclei) for the demo.
They exercise the pipeline; they are not tissue."""
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

out, n = Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 24
out.mkdir(parents=True, exist_ok=True)
rng = np.random.default_rng(0)
for i in range(n):
    img = Image.new("RGB", (256, 256), tuple(int(c) for c in rng.normal((230, 170, 200), 10)))
    draw = ImageDraw.Draw(img)
    for _ in range(rng.integers(20, 120)):
        x, y, r = rng.integers(0, 256), rng.integers(0, 256), rng.integers(3, 9)
        draw.ellipse((x - r, y - r, x + r, y + r), fill=tuple(int(c) for c in rng.normal((90, 50, 140), 15)))
    img.filter(ImageFilter.GaussianBlur(1.2)).save(out / f"tile_{i:03d}.png")
print(f"wrote {n} synthetic tiles to {out}")
