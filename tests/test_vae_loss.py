"""LPIPS and PatchGAN invariants on the CPU, with random weights (no network)."""
import pytest
import torch

from vae_loss import (
    LPIPS,
    LPIPS_SCALE,
    LPIPS_SHIFT,
    VGG16_CHANNELS,
    NLayerDiscriminator,
    channel_normalize,
    hinge_d_loss,
    hinge_g_loss,
    load_lpips_heads,
)

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def lpips():
    torch.manual_seed(0)
    return LPIPS(pretrained=False, heads="uniform")


def images(seed, n=2, size=32):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g) * 2 - 1


def test_lpips_identity_positive_symmetric(lpips):
    x, y = images(0), images(1)
    assert torch.allclose(lpips(x, x), torch.zeros(2), atol=1e-6)
    d_xy, d_yx = lpips(x, y), lpips(y, x)
    assert d_xy.shape == (2,) and (d_xy > 1e-4).all()
    assert torch.allclose(d_xy, d_yx, atol=1e-6)


def test_lpips_grows_with_perturbation(lpips):
    x = images(0)
    noise = images(5) - images(6)
    d = [lpips(x, (x + a * noise).clamp(-1, 1)).mean().item() for a in (0.02, 0.2, 1.0)]
    assert d[0] < d[1] < d[2]


def test_lpips_matches_hand_computation(lpips):
    """The forward equals the definition written out: scale, VGG taps, unit-normalise, head, mean, sum."""
    x, y = images(2), images(3)
    shift, scale = torch.tensor(LPIPS_SHIFT).view(1, 3, 1, 1), torch.tensor(LPIPS_SCALE).view(1, 3, 1, 1)
    fx, fy = lpips.vgg((x - shift) / scale), lpips.vgg((y - shift) / scale)
    ref = 0
    for a, b in zip(fx, fy):
        a = a / a.pow(2).sum(1, keepdim=True).sqrt().clamp_min(1e-12)
        b = b / b.pow(2).sum(1, keepdim=True).sqrt().clamp_min(1e-12)
        ref = ref + ((a - b) ** 2).mean(dim=(1, 2, 3))  # uniform heads: channel mean
    assert torch.allclose(lpips(x, y), ref, rtol=1e-4, atol=1e-7)


def test_lpips_gradient_is_finite_and_vgg_frozen(lpips):
    x, y = images(0), images(1).requires_grad_(True)
    lpips(x, y).sum().backward()
    assert torch.isfinite(y.grad).all() and y.grad.abs().sum() > 0
    assert all(not p.requires_grad for p in lpips.parameters())
    lpips.train()
    assert not lpips.training and not lpips.vgg.training


def test_channel_normalize_zero_column_has_finite_grad():
    f = torch.zeros(1, 4, 2, 2)
    f[0, :, 0, 0] = torch.tensor([3.0, 4.0, 0.0, 0.0])
    f.requires_grad_(True)
    n = channel_normalize(f)
    assert torch.allclose(n[0, :, 0, 0], torch.tensor([0.6, 0.8, 0.0, 0.0]))
    n.sum().backward()
    assert torch.isfinite(f.grad).all()


def test_lpips_heads_file_layout(tmp_path, lpips):
    """A file in the published `vgg.pth` layout is loaded and weights the channels as given."""
    torch.manual_seed(0)
    heads = {f"lin{k}.model.1.weight": torch.rand(1, c, 1, 1) for k, c in enumerate(VGG16_CHANNELS)}
    torch.save(heads, tmp_path / "vgg.pth")
    loaded = load_lpips_heads(tmp_path / "vgg.pth")
    assert all(torch.equal(a, heads[f"lin{k}.model.1.weight"]) for k, a in enumerate(loaded))

    calibrated = LPIPS(pretrained=False, heads=tmp_path / "vgg.pth")
    calibrated.vgg.load_state_dict(lpips.vgg.state_dict())  # same features as the uniform fixture
    assert calibrated.calibrated and not lpips.calibrated
    x, y = images(0), images(1)
    assert not torch.allclose(calibrated(x, y), lpips(x, y))
    # Heads equal to 1/C reproduce the uniform distance exactly.
    torch.save({f"lin{k}.model.0.weight": torch.full((1, c, 1, 1), 1.0 / c) for k, c in enumerate(VGG16_CHANNELS)},
               tmp_path / "flat.pth")  # the layout without the Dropout in front loads too
    for k, w in enumerate(load_lpips_heads(tmp_path / "flat.pth")):
        setattr(calibrated, f"head{k}", w)
    assert torch.allclose(calibrated(x, y), lpips(x, y), atol=1e-7)


CALIBRATED_SUMS = (6.93, 8.86, 17.52, 51.52, 47.03)  # SPEC: the lpips 0.1.4 wheel's vgg.pth


def test_default_lpips_carries_the_calibrated_heads(lpips):
    """Without a heads argument the loss weighs VGG's channels with REPA-E's calibrated heads, not 1/C."""
    default = LPIPS(pretrained=False)
    sums = [round(float(getattr(default, f"head{k}").sum()), 2) for k in range(5)]
    assert default.calibrated and sums == list(CALIBRATED_SUMS)
    assert [float(getattr(lpips, f"head{k}").sum()) for k in range(5)] == pytest.approx([1.0] * 5)


def test_lpips_equals_the_lpips_package():
    """Same VGG weights, same heads: our LPIPS is the lpips package's LPIPS(net='vgg') to float precision."""
    lpips_pkg = pytest.importorskip("lpips")
    torch.manual_seed(1)
    reference = lpips_pkg.LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False).eval()
    ours = LPIPS(pretrained=False)
    # the package slices torchvision's vgg16.features (sliceK.N keeps index N); timm names it features_N
    vgg = {f"features_{k.split('.')[1]}.{k.split('.')[2]}": v for k, v in reference.net.state_dict().items()}
    ours.vgg.load_state_dict(vgg)
    x, y = images(7, size=64), images(8, size=64)
    with torch.no_grad():
        assert torch.allclose(ours(x, y), reference(x, y).flatten(), rtol=1e-4, atol=1e-6)
        # REPA-E's quirk is the same distance on twice-rescaled images (VGG sees [-3, 1])
        quirk = LPIPS(pretrained=False, vgg_range_quirk=True)
        quirk.vgg.load_state_dict(vgg)
        assert torch.allclose(quirk(x, y), reference(2 * x - 1, 2 * y - 1).flatten(), rtol=1e-4, atol=1e-6)
        assert not torch.allclose(quirk(x, y), ours(x, y), rtol=1e-3)


def test_lpips_heads_bad_file(tmp_path):
    torch.save({"lin0.model.1.weight": torch.rand(1, 3, 1, 1)}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="not an LPIPS VGG heads file"):
        load_lpips_heads(tmp_path / "bad.pth")
    with pytest.raises(FileNotFoundError, match="lpips"):
        load_lpips_heads(tmp_path / "missing.pth")


def test_discriminator_layout_and_shape():
    torch.manual_seed(0)
    d = NLayerDiscriminator()
    out = d(torch.randn(2, 3, 224, 224))
    assert out.shape == (2, 1, 26, 26)
    convs = [m for m in d.main if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.stride[0]) for c in convs] == [
        (3, 64, 2), (64, 128, 2), (128, 256, 2), (256, 512, 1), (512, 1, 1)]
    assert all(c.kernel_size == (4, 4) and c.padding == (1, 1) for c in convs)
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in d.main) == 3
    # taming's state-dict names, so its published discriminators load as they are.
    names = {"main.0.weight", "main.0.bias", "main.2.weight", "main.3.running_mean", "main.11.weight"}
    assert names <= set(d.state_dict())
    assert "main.2.bias" not in d.state_dict()  # no conv bias before BatchNorm
    assert abs(convs[1].weight.std().item() - 0.02) < 0.002


def test_discriminator_every_parameter_gets_gradient():
    d = NLayerDiscriminator()
    d(torch.randn(2, 3, 64, 64)).mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in d.parameters())


def test_hinge_losses_on_constructed_logits():
    real = torch.tensor([2.0, 0.5, -1.0, 0.0])  # relu(1 - real) = 0, 0.5, 2, 1 -> mean 0.875
    fake = torch.tensor([-2.0, -0.5, 1.0, 0.0])  # relu(1 + fake) = 0, 0.5, 2, 1 -> mean 0.875
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.875)
    # A confident, correct discriminator has zero loss; margins beyond 1 are not rewarded.
    assert hinge_d_loss(torch.full((3,), 5.0), torch.full((3,), -5.0)).item() == 0.0
    assert hinge_d_loss(torch.zeros(3), torch.zeros(3)).item() == pytest.approx(1.0)
    assert hinge_g_loss(fake).item() == pytest.approx(0.375)
    assert hinge_g_loss(torch.tensor([[1.0, 3.0]])).item() == pytest.approx(-2.0)


def test_lpips_uses_the_published_constants_and_taps(lpips):
    """Written from the lpips package (ScalingLayer, vgg16 slices), not from vae_loss.py: the hand
    computation above would agree with wrong constants or taps, since it reuses the module's own."""
    assert LPIPS_SHIFT == (-0.030, -0.088, -0.188) and LPIPS_SCALE == (0.458, 0.448, 0.450)
    # torchvision's vgg16.features: relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
    assert lpips.vgg.feature_info.module_name() == ["features.3", "features.8", "features.15", "features.22",
                                                    "features.29"]
    assert VGG16_CHANNELS == (64, 128, 256, 512, 512)
