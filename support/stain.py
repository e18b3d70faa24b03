"""How well a tile was restained (sample.py --restain): did the result keep the content tile's cells, and did it
take the style tile's stain? Two comparisons, each of the result against both tiles:

    content kept = SSIM(result, content) - SSIM(result, style)        on grey levels; > 0: the content's structure
    stain moved  = d(result, content) - d(result, style)              on colour statistics; > 0: nearer the style's

SSIM as Wang et al. (2004, Eq. 13), with their 11 x 11 circular-symmetric Gaussian window (sigma 1.5, §III-C),
K1 = 0.01, K2 = 0.03 and L = 255, on the grey level (ITU-R BT.601 luma, PIL's "L" conversion, unrounded),
averaged over the positions where the whole window fits (no padding): scikit-image's structural_similarity with
gaussian_weights=True and population covariances gives the same number. Colour statistics: the optical density of
each RGB channel, OD = -log10(I / 255) (Beer-Lambert: stain absorbs, so OD adds up across stains; I is floored at
1e-6 of white, so black is finite: OD 6), its mean and standard deviation (population, ddof 0) over the tile: six
numbers, compared by Euclidean distance.

stain_balance (demo.py picks its pinkest and most purple tiles with it) deconvolves the OD onto Ruifrok and
Johnston's (2001) haematoxylin, eosin and DAB vectors, as scikit-image's rgb2hed computes it. Left out:
multi-scale SSIM; stain-vector estimates per slide (Macenko, Vahadane).
"""
import numpy as np
import torch
import torch.nn.functional as F

from support.cli import InputError
from support.outputs import save_json

SSIM_WINDOW, SSIM_SIGMA = 11, 1.5  # Wang et al. 2004, §III-C
SSIM_K1, SSIM_K2, GREY_RANGE = 0.01, 0.03, 255.0
LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601 weights of R, G, B
OD_FLOOR = 1e-6  # transmitted light is floored at this share of white: black's optical density is 6, not infinite
# Ruifrok and Johnston (2001), Table 1, normalised: the optical density of haematoxylin, eosin and DAB, one row each
RGB_FROM_HED = torch.tensor([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], dtype=torch.float64)
HED_FROM_RGB = torch.linalg.inv(RGB_FROM_HED)
WHITE = 210  # a grey level above this is glass, not stain


def as_rgb(image):
    """uint8 (H, W, 3) (a PNG read by PIL) or (3, H, W) (a tile of support.conditioning) -> float64 (H, W, 3)."""
    x = image.double() if torch.is_tensor(image) else torch.from_numpy(np.array(image, dtype=np.float64))
    if x.ndim == 3 and x.shape[0] == 3 and x.shape[2] != 3:
        x = x.permute(1, 2, 0)
    if x.ndim != 3 or x.shape[2] != 3:
        raise InputError(f"expected an RGB image (H, W, 3) or (3, H, W), got shape {tuple(x.shape)}")
    return x


def grey(image):
    """RGB -> grey level (H, W) in [0, 255], float64."""
    return as_rgb(image) @ torch.tensor(LUMA, dtype=torch.float64)


def gaussian_window(size=SSIM_WINDOW, sigma=SSIM_SIGMA):
    """(size, size) weights summing to 1: exp(-r^2 / 2 sigma^2) around the centre."""
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-x ** 2 / (2 * sigma ** 2))
    return torch.outer(g, g) / g.sum() ** 2


def ssim(a, b):
    """Mean SSIM of two grey-level images (H, W) in [0, 255] (Eq. 13 of Wang et al. 2004; the local means,
    variances and covariance weighted by the Gaussian window, Eq. 14-16). 1 for identical images."""
    x, y = (im.double() if torch.is_tensor(im) else torch.from_numpy(np.array(im, dtype=np.float64))  # any strides
            for im in (a, b))
    x, y = x[None, None], y[None, None]  # (1, 1, H, W)
    if x.shape != y.shape or min(x.shape[-2:]) < SSIM_WINDOW:
        raise InputError(f"SSIM compares two images of one size, at least {SSIM_WINDOW} px: got "
                         f"{tuple(x.shape[-2:])} and {tuple(y.shape[-2:])}")
    window = gaussian_window()[None, None]

    def local_mean(z):
        return F.conv2d(z, window)  # (1, 1, H - 10, W - 10): every position where the window fits

    mu_x, mu_y = local_mean(x), local_mean(y)
    var_x, var_y = local_mean(x * x) - mu_x ** 2, local_mean(y * y) - mu_y ** 2
    cov = local_mean(x * y) - mu_x * mu_y
    c1, c2 = (SSIM_K1 * GREY_RANGE) ** 2, (SSIM_K2 * GREY_RANGE) ** 2
    index = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))
    return index.mean().item()


def optical_density(image):
    """RGB uint8 -> (H W, 3) float64: OD = -log10(I / 255) of every pixel and channel, I floored at OD_FLOOR."""
    return -torch.log10((as_rgb(image) / 255).clamp(min=OD_FLOOR)).flatten(0, 1)


def stain_concentrations(image):
    """RGB uint8 -> (H W, 3) float64: haematoxylin, eosin and DAB per pixel (Ruifrok and Johnston 2001), in
    scikit-image's units (the OD divided by the floor's, 6, then deconvolved, and clipped at 0)."""
    return ((optical_density(image) / -np.log10(OD_FLOOR)) @ HED_FROM_RGB).clamp(min=0)


def optical_density_stats(image):
    """RGB uint8 -> (6,) float64: the mean, then the standard deviation, of each channel's optical density."""
    od = optical_density(image)  # (H W, 3)
    return torch.cat([od.mean(0), od.std(0, correction=0)])


def stain_balance(image):
    """(mean haematoxylin minus mean eosin, share of white pixels) of an H&E tile: colour deconvolution of the
    optical density onto the H and E stain vectors (Ruifrok and Johnston 2001); > 0: more purple than pink."""
    concentrations = stain_concentrations(image)  # (H W, 3): H, E, DAB
    white = (as_rgb(image).mean(-1) > WHITE).double().mean().item()
    return (concentrations[:, 0].mean() - concentrations[:, 1].mean()).item(), white


def restain_scores(result, content, style):
    """The numbers of a restained tile: SSIM of its grey level to the content's and the style's, the distance of
    its colour statistics to both, and the two differences (content kept, stain moved) of the module docstring."""
    ssim_content, ssim_style = ssim(grey(result), grey(content)), ssim(grey(result), grey(style))
    od = optical_density_stats(result)
    od_content = (od - optical_density_stats(content)).norm().item()
    od_style = (od - optical_density_stats(style)).norm().item()
    return dict(ssim_to_content=ssim_content, ssim_to_style=ssim_style, od_distance_to_content=od_content,
                od_distance_to_style=od_style, content_kept=ssim_content - ssim_style,
                stain_moved=od_content - od_style)


def score_restained(items, strength, path):
    """(name, result, content, style) of every restained tile -> the mean of their scores; one line per tile
    is printed, and path (JSON) gets the strength, every tile's scores and their mean."""
    tiles = {}
    for name, result, content, style in items:
        s = tiles[name] = restain_scores(result, content, style)
        print(f"{name}: content kept {s['content_kept']:+.3f} (SSIM {s['ssim_to_content']:.3f} to the content, "
              f"{s['ssim_to_style']:.3f} to the style); stain moved {s['stain_moved']:+.3f} (OD statistics "
              f"{s['od_distance_to_content']:.3f} from the content's, "
              f"{s['od_distance_to_style']:.3f} from the style's)",
              flush=True)
    mean = {k: sum(t[k] for t in tiles.values()) / len(tiles) for k in next(iter(tiles.values()))}
    print(f"mean of {len(tiles)} tiles: content kept {mean['content_kept']:+.3f}, stain moved "
          f"{mean['stain_moved']:+.3f} (strength {strength}; {path})", flush=True)
    save_json({"strength": strength, "mean": mean, "tiles": tiles}, path)
    return mean
