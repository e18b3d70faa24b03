"""What a tile is in this repo, in one module that imports nothing heavy (every tool reads it).

CytoSyn trains on tiles of 224 x 224 px at 0.5 µm/px (20x), CytoSyn §3.2. Tiles are image files of the kinds
below; whole-slide files never are. A tile is resampled with one of the named kernels of Pillow (antialiased
when it shrinks): tiling.py to reach 0.5 µm/px, the benchmark to reach an extractor's input size (§4.3).
"""
from PIL import Image

TILE_SIZE, TILE_MPP = 224, 0.5  # CytoSyn's training tiles: 224 x 224 px at 0.5 µm/px, 20x (§3.2)
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff")  # tiles: the one list of the repo
SLIDE_EXTENSIONS = (".svs", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".czi", ".isyntax", ".svslide",
                    ".dcm")  # whole-slide formats: never tiles (a .tif may be either)
RESIZE_KERNELS = {"lanczos": Image.Resampling.LANCZOS, "bicubic": Image.Resampling.BICUBIC,
                  "bilinear": Image.Resampling.BILINEAR, "box": Image.Resampling.BOX,
                  "nearest": Image.Resampling.NEAREST}  # --resize-kernel, in every tool that resizes tiles
