"""Core models: sizes, REPA-E/LDM state-dict layout, diffusers conversion, adaLN-Zero, losses."""
import math

import pytest
import torch

import features
import repa_loss
import sit
import vae
from support import weights

torch.set_num_threads(1)


def n_params(model):
    return sum(p.numel() for p in model.parameters())


# -- sizes (paper §3.1), built on the meta device so no memory is spent ---------------------------
def test_full_size_parameter_counts():
    with torch.device("meta"):
        denoiser = sit.build_sit("SiT-XL/2", input_size=28)
        autoencoder = vae.build_vae("f8d4")
    assert abs(n_params(denoiser) - 683e6) / 683e6 < 0.01
    assert abs(n_params(autoencoder) - 83.65e6) / 83.65e6 < 0.001


def test_h0_mini_architecture_offline():
    encoder = features.load_encoder("h0-mini", pretrained=False)
    assert abs(n_params(encoder) - 86e6) / 86e6 < 0.02
    with torch.no_grad():
        tokens = encoder.forward_features(torch.zeros(1, 3, 224, 224))
    assert tokens.shape == (1, 261, 768)  # CLS, 4 registers, 16 x 16 patches (H0-mini's model card)


# -- state-dict layouts, written from the spec, not from the code under test ----------------------
def repae_sit_table(depth, D, z_dim=768, proj=2048, p=2, C=4, tokens=196):
    """REPA-E's SiT key -> shape, for every part CytoSyn shares with it."""
    table = {"pos_embed": (1, tokens, D), "x_embedder.proj.weight": (D, C, p, p), "x_embedder.proj.bias": (D,),
             "t_embedder.mlp.0.weight": (D, 256), "t_embedder.mlp.0.bias": (D,),
             "t_embedder.mlp.2.weight": (D, D), "t_embedder.mlp.2.bias": (D,),
             "projectors.0.0.weight": (proj, D), "projectors.0.0.bias": (proj,),
             "projectors.0.2.weight": (proj, proj), "projectors.0.2.bias": (proj,),
             "projectors.0.4.weight": (z_dim, proj), "projectors.0.4.bias": (z_dim,),
             "final_layer.linear.weight": (p * p * C, D), "final_layer.linear.bias": (p * p * C,),
             "final_layer.adaLN_modulation.1.weight": (2 * D, D), "final_layer.adaLN_modulation.1.bias": (2 * D,),
             "bn.running_mean": (C,), "bn.running_var": (C,), "bn.num_batches_tracked": ()}
    for i in range(depth):
        b = f"blocks.{i}."
        table.update({b + "attn.qkv.weight": (3 * D, D), b + "attn.qkv.bias": (3 * D,),
                      b + "attn.proj.weight": (D, D), b + "attn.proj.bias": (D,),
                      b + "mlp.fc1.weight": (4 * D, D), b + "mlp.fc1.bias": (4 * D,),
                      b + "mlp.fc2.weight": (D, 4 * D), b + "mlp.fc2.bias": (D,),
                      b + "adaLN_modulation.1.weight": (6 * D, D), b + "adaLN_modulation.1.bias": (6 * D,)})
    return table


def shapes(module):
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def test_sit_xl_matches_repae_layout():
    with torch.device("meta"):
        model = sit.build_sit("SiT-XL/2", input_size=28)
    ours = shapes(model)
    expected = repae_sit_table(depth=28, D=1152)
    shared = {k: v for k, v in ours.items() if not k.startswith("y_embedder.")}
    assert shared == expected  # every REPA-E key, and nothing else besides the conditioning embedder


def test_repae_state_dict_loads_strictly():
    torch.manual_seed(0)
    model = sit.build_sit("SiT-S/2", input_size=28)
    sd = {k: torch.randn(s) if s else torch.tensor(7) for k, s in repae_sit_table(depth=12, D=384).items()}
    sd.update({k: v.clone() for k, v in model.state_dict().items() if k.startswith("y_embedder.")})
    weights.load_state_dict_checked(model, sd, "a REPA-E state dict")
    assert torch.equal(model.state_dict()["blocks.3.mlp.fc1.weight"], sd["blocks.3.mlp.fc1.weight"])


def ldm_vae_table(ch=128, mult=(1, 2, 4, 4), blocks=2, z=4):
    """LDM AutoencoderKL key -> shape (the layout of REPA-E's sdvae-f8d4.pt)."""
    t = {}

    def conv(name, cout, cin, k):
        t[name + ".weight"], t[name + ".bias"] = (cout, cin, k, k), (cout,)

    def norm(name, c):
        t[name + ".weight"], t[name + ".bias"] = (c,), (c,)

    def resnet(name, cin, cout):
        norm(name + ".norm1", cin), conv(name + ".conv1", cout, cin, 3)
        norm(name + ".norm2", cout), conv(name + ".conv2", cout, cout, 3)
        if cin != cout:
            conv(name + ".nin_shortcut", cout, cin, 1)

    def mid(name, c):
        resnet(name + ".block_1", c, c), resnet(name + ".block_2", c, c), norm(name + ".attn_1.norm", c)
        for proj in ("q", "k", "v", "proj_out"):
            conv(f"{name}.attn_1.{proj}", c, c, 1)

    conv("encoder.conv_in", ch, 3, 3)
    cin = ch
    for i, m in enumerate(mult):
        for j in range(blocks):
            resnet(f"encoder.down.{i}.block.{j}", cin, ch * m)
            cin = ch * m
        if i < len(mult) - 1:
            conv(f"encoder.down.{i}.downsample.conv", cin, cin, 3)
    mid("encoder.mid", cin), norm("encoder.norm_out", cin), conv("encoder.conv_out", 2 * z, cin, 3)
    conv("quant_conv", 2 * z, 2 * z, 1), conv("post_quant_conv", z, z, 1)
    conv("decoder.conv_in", cin, z, 3), mid("decoder.mid", cin)
    for i in reversed(range(len(mult))):
        for j in range(blocks + 1):
            resnet(f"decoder.up.{i}.block.{j}", cin, ch * mult[i])
            cin = ch * mult[i]
        if i > 0:
            conv(f"decoder.up.{i}.upsample.conv", cin, cin, 3)
    norm("decoder.norm_out", cin), conv("decoder.conv_out", 3, cin, 3)
    return t


def test_vae_matches_ldm_layout():
    with torch.device("meta"):
        model = vae.build_vae("f8d4")
    assert shapes(model) == ldm_vae_table()


def test_checkpoint_of_another_preset_is_refused_clearly():
    small = vae.build_vae("tiny")
    with pytest.raises(ValueError, match="another preset"):
        weights.load_state_dict_checked(small, sit.build_sit("SiT-T/2").state_dict(), "checkpoint.pt")
    with pytest.raises(ValueError, match="wrong shapes"):
        weights.load_state_dict_checked(sit.build_sit("SiT-T/2", cond_dim=32),
                                        sit.build_sit("SiT-T/2").state_dict(), "x")


def test_diffusers_vae_converts_to_identical_outputs():
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    ref = diffusers.AutoencoderKL(down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                                  block_out_channels=[128, 256, 512, 512], layers_per_block=2, latent_channels=4,
                                  norm_num_groups=32).double().eval()
    ours = vae.build_vae("f8d4").double().eval()
    weights.load_state_dict_checked(ours, vae.convert_diffusers_state_dict(ref.state_dict()), "diffusers VAE")
    old_names = {"to_q.": "query.", "to_k.": "key.", "to_v.": "value.", "to_out.0.": "proj_attn."}  # diffusers < 0.14
    old = {}
    for key, value in ref.state_dict().items():
        for new, was in old_names.items():
            key = key.replace(f"attentions.0.{new}", f"attentions.0.{was}")
        old[key] = value
    assert any(".query." in k for k in old)
    weights.load_state_dict_checked(vae.build_vae("f8d4").double(), vae.convert_diffusers_state_dict(old), "old VAE")
    x = torch.rand(1, 3, 32, 32, dtype=torch.float64) * 2 - 1
    z = torch.randn(1, 4, 4, 4, dtype=torch.float64)
    with torch.no_grad():
        post, ref_post = ours.encode(x), ref.encode(x).latent_dist
        assert torch.allclose(post.mean, ref_post.mean, atol=1e-5, rtol=0)
        assert torch.allclose(post.std, ref_post.std, atol=1e-5, rtol=0)
        assert torch.allclose(ours.decode(z), ref.decode(z).sample, atol=1e-5, rtol=0)


# -- VAE behaviour ---------------------------------------------------------------------------------
def test_vae_shapes_kl_and_bad_input():
    model = vae.build_vae("tiny")
    x = torch.rand(2, 3, 64, 48) * 2 - 1
    posterior, z, recon = model(x)
    assert z.shape == (2, 4, 8, 6) and recon.shape == x.shape
    assert posterior.kl().shape == (2,) and (posterior.kl() >= 0).all()
    # KL of N(m, s^2) against N(0, 1) per element: 0.5 (m^2 + s^2 - 1 - log s^2)
    moments = torch.zeros(1, 8, 1, 1)
    moments[0, 0], moments[0, 4] = 2.0, torch.log(torch.tensor(0.25))
    expected = 0.5 * (4.0 + 0.25 - 1 - torch.log(torch.tensor(0.25)))
    assert torch.allclose(vae.DiagonalGaussian(moments).kl(), expected.view(1))
    with pytest.raises(ValueError, match="multiples of 8"):
        model.encode(torch.zeros(1, 3, 60, 64))
    with pytest.raises(ValueError, match="RGB"):
        model.encode(torch.zeros(1, 1, 64, 64))
    with pytest.raises(ValueError, match=r"float images in \[-1, 1\].*uint8"):
        model.encode(torch.zeros(1, 3, 64, 64, dtype=torch.uint8))
    with pytest.raises(ValueError, match="unknown VAE preset"):
        vae.build_vae("f16d32")


# -- SiT behaviour ---------------------------------------------------------------------------------
def test_fresh_sit_outputs_zero_and_shapes():
    model = sit.build_sit("SiT-T/2", input_size=8, cond_dim=16, z_dim=24)
    v, proj = model(torch.randn(3, 4, 8, 8), torch.rand(3), torch.randn(3, 16))
    assert v.shape == (3, 4, 8, 8) and proj.shape == (3, 16, 24)
    assert torch.count_nonzero(v) == 0  # adaLN-Zero + zeroed output layer
    none, proj2 = model(torch.randn(3, 4, 8, 8), torch.rand(3), None, align_only=True)
    assert none is None and proj2.shape == (3, 16, 24)


def reference_sit_forward(sd, x, t, cond, heads, p=2, C=4, freqs=256):
    """SiT forward written from the spec with plain tensor ops on a state dict (REPA-E's names):
    [cos, sin] time features of raw t, adaLN chunks (shift, scale, gate) x (msa, mlp), timm's qkv
    layout (3, heads, head_dim), GELU tanh, final (shift, scale), then tokens -> (p, q, c) patches."""

    def lin(x, name):
        return x @ sd[f"{name}.weight"].T + sd[f"{name}.bias"]

    def norm(x):
        return torch.nn.functional.layer_norm(x, x.shape[-1:], eps=1e-6)

    silu, B = torch.nn.functional.silu, x.shape[0]
    x = torch.nn.functional.conv2d(x, sd["x_embedder.proj.weight"], sd["x_embedder.proj.bias"], stride=p)
    h = x.shape[-1]
    x = x.flatten(2).transpose(1, 2) + sd["pos_embed"]
    f = torch.exp(-math.log(10000) * torch.arange(freqs // 2) / (freqs // 2))
    tf = torch.cat([torch.cos(t[:, None] * f), torch.sin(t[:, None] * f)], 1)
    c = lin(silu(lin(tf, "t_embedder.mlp.0")), "t_embedder.mlp.2") + lin(silu(lin(cond, "y_embedder.mlp.0")),
                                                                        "y_embedder.mlp.2")
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    for i in range(depth):
        b = f"blocks.{i}"
        m = lin(silu(c), f"{b}.adaLN_modulation.1")[:, None].chunk(6, -1)
        y = norm(x) * (1 + m[1]) + m[0]
        T, D = y.shape[1], y.shape[2]
        q, k, v = lin(y, f"{b}.attn.qkv").reshape(B, T, 3, heads, D // heads).permute(2, 0, 3, 1, 4)
        a = ((q @ k.transpose(-1, -2)) / math.sqrt(D // heads)).softmax(-1) @ v
        x = x + m[2] * lin(a.transpose(1, 2).reshape(B, T, D), f"{b}.attn.proj")
        y = norm(x) * (1 + m[4]) + m[3]
        y = lin(torch.nn.functional.gelu(lin(y, f"{b}.mlp.fc1"), approximate="tanh"), f"{b}.mlp.fc2")
        x = x + m[5] * y
    shift, scale = lin(silu(c), "final_layer.adaLN_modulation.1")[:, None].chunk(2, -1)
    x = lin(norm(x) * (1 + scale) + shift, "final_layer.linear")
    x = x.reshape(B, h, h, p, p, C).permute(0, 5, 1, 3, 2, 4)   # (B, c, h, p, w, q)
    return x.reshape(B, C, h * p, h * p)


def test_sit_forward_matches_a_reference_written_from_the_spec():
    """Names and shapes are not enough for released weights: the order of the time features, the
    adaLN chunks, the qkv layout and the patch order must match REPA-E's too (random weights here)."""
    torch.manual_seed(0)
    model = sit.build_sit("SiT-T/2", input_size=8, cond_dim=16).double().eval()
    with torch.no_grad():
        for q in model.parameters():
            q.add_(0.3 * torch.randn_like(q))  # adaLN-Zero would make every block the identity
    x, t, cond = torch.randn(3, 4, 8, 8, dtype=torch.float64), torch.rand(3, dtype=torch.float64), torch.randn(
        3, 16, dtype=torch.float64)
    with torch.no_grad():
        v, _ = model(x, t, cond)
        ref = reference_sit_forward(model.state_dict(), x, t, cond, heads=model.config["num_heads"])
    assert v.abs().mean() > 0.1
    torch.testing.assert_close(v, ref, atol=1e-4, rtol=1e-4)  # the SiT computes its time features in fp32


def test_every_parameter_gets_a_gradient():
    torch.manual_seed(0)
    model = sit.build_sit("SiT-T/2", input_size=8, cond_dim=16, z_dim=24).train()
    for p in model.parameters():  # leave adaLN-Zero's zeros: with them most gradients are exactly 0
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.05)
    x, target = torch.randn(4, 4, 8, 8), torch.randn(4, 16, 24)
    drop = torch.tensor([True, False, True, False])  # the null embedding must get a gradient too
    v, proj = model(model.normalize(x), torch.rand(4), torch.randn(4, 16), drop=drop)
    (v.pow(2).mean() + repa_loss.repa_loss(proj, target)).backward()
    for name, p in model.named_parameters():
        if name == "pos_embed":
            assert not p.requires_grad and p.grad is None  # fixed sin-cos, frozen
        else:
            assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_align_only_equals_the_full_pass_projection():
    torch.manual_seed(0)
    model = sit.build_sit("SiT-T/2", input_size=8, cond_dim=16, z_dim=24).eval()
    args = (torch.randn(2, 4, 8, 8), torch.rand(2), torch.randn(2, 16))
    assert torch.equal(model(*args)[1], model(*args, align_only=True)[1])


def test_patchify_roundtrip_and_pos_embed():
    x = torch.randn(2, 4, 28, 28)
    tokens = sit.patchify(x, 2)
    assert tokens.shape == (2, 196, 16)
    assert torch.equal(sit.unpatchify(tokens, 2, 4), x)
    assert torch.equal(tokens[0, 15, :4], x[0, :, 2, 2])  # token 15 = row 1, col 1; first entry (p, q) = (0, 0)
    pe = sit.sincos_pos_embed(8, 3)  # (9, 8): [sin, cos](col * 10000^(-k/2)), then the same for the row
    # token 5 = row 1, col 2: first half encodes col 2, second half row 1 (REPA-E's order)
    expected = [0.9093, 0.0200, -0.4161, 0.9998, 0.8415, 0.0100, 0.5403, 0.99995]
    torch.testing.assert_close(torch.tensor(pe[5]), torch.tensor(expected).double(), atol=1e-4, rtol=0)


def test_conditioning_null_and_dropout():
    torch.manual_seed(0)
    model = sit.build_sit("SiT-T/2", input_size=8, cond_dim=16, cond_dropout=0.1).eval()
    features = torch.randn(4, 16) * 3
    real, null = model.y_embedder(features), model.y_embedder(None)
    assert null.shape == (1, 64) and not torch.allclose(real, null.expand_as(real))
    forced = model.y_embedder(features, drop=torch.tensor([True, False, True, False]))
    assert torch.allclose(forced[0], null[0]) and torch.allclose(forced[1], real[1])
    model.train()
    rows = model.y_embedder(torch.randn(20000, 16) * 3)
    dropped = torch.isclose(rows, model.y_embedder(None)).all(dim=1).float().mean()
    assert abs(dropped.item() - 0.1) < 0.01  # 3 standard errors is 0.006


def test_bn_normalize_denormalize():
    model = sit.build_sit("SiT-T/2", input_size=8).train()
    bn = model.bn
    assert (bn.eps, bn.momentum, bn.affine) == (1e-4, 0.1, False)  # REPA-E's latent BatchNorm
    z = torch.randn(64, 4, 8, 8) * 3 + 2
    model.normalize(z)  # one train-mode step: running = 0.9 * (0, 1) + 0.1 * batch (unbiased variance)
    torch.testing.assert_close(bn.running_mean, 0.1 * z.mean((0, 2, 3)))
    torch.testing.assert_close(bn.running_var, 0.9 + 0.1 * z.transpose(0, 1).flatten(1).var(1))
    for _ in range(200):  # running stats converge to the data's
        model.normalize(z)
    torch.testing.assert_close(bn.running_mean, z.mean((0, 2, 3)), atol=1e-4, rtol=1e-4)
    model.eval()
    torch.testing.assert_close(model.denormalize(model.normalize(z)), z, atol=2e-3, rtol=1e-3)


def test_sit_bad_input():
    model = sit.build_sit("SiT-T/2", input_size=8, cond_dim=16)
    with pytest.raises(ValueError, match=r"\(B, 4, 8, 8\)"):
        model(torch.zeros(1, 4, 16, 16), torch.rand(1))
    with pytest.raises(ValueError, match="conditioning"):
        model(torch.zeros(1, 4, 8, 8), torch.rand(1), torch.zeros(1, 768))
    with pytest.raises(ValueError, match="tensors"):
        model(torch.zeros(1, 4, 8, 8), 0.5)
    with pytest.raises(ValueError, match="bool mask"):
        model(torch.zeros(2, 4, 8, 8), torch.rand(2), torch.zeros(2, 16), drop=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="unknown SiT preset"):
        sit.build_sit("SiT-H/2")


# -- losses and the interpolant -------------------------------------------------------------------
def test_repa_loss_values():
    a = torch.randn(2, 10, 8)
    assert torch.allclose(repa_loss.repa_loss(a, 3 * a), torch.tensor(-1.0))
    e = torch.eye(8)
    assert torch.allclose(repa_loss.repa_loss(e[None, :4], e[None, 4:]), torch.tensor(0.0))
    big = torch.full((1, 4, 8), 300.0, dtype=torch.float16)  # |x|^2 overflows fp16
    assert torch.isfinite(repa_loss.repa_loss(big, big))
    with pytest.raises(ValueError, match="token grid"):
        repa_loss.repa_loss(torch.zeros(1, 4, 8), torch.zeros(1, 9, 8))


def test_token_resize_keeps_constants_and_follows_grid():
    const = torch.full((2, 256, 5), 0.7)
    out = features.resize_tokens(const, 14)
    assert out.shape == (2, 196, 5) and torch.allclose(out, const[:, :196], atol=1e-6)
    ramp = torch.arange(16.0).repeat(16, 1).reshape(1, 256, 1)  # value = column index
    out = features.resize_tokens(ramp, 4).view(4, 4)
    assert (out[:, 1:] > out[:, :-1]).all() and torch.allclose(out[0], out[3])
    stripes = (torch.arange(16.0) % 2 * 2 - 1).repeat(16, 1).reshape(1, 256, 1)  # columns +1, -1, +1, ...
    assert features.resize_tokens(stripes, 14).abs().max() < 0.85  # antialiased; without: 0.97


def test_encoder_features_shapes_and_bad_input():
    encoder = features.load_encoder("tiny", pretrained=False)
    images = torch.randint(0, 256, (2, 3, 224, 224), dtype=torch.uint8)
    cls, patches = features.encoder_features(encoder, images, token_grid=14)
    assert cls.shape == (2, 48) and patches.shape == (2, 196, 48)
    cls2, _ = features.encoder_features(encoder, images.float() / 255)
    assert torch.allclose(cls, cls2, atol=1e-5)
    with pytest.raises(ValueError, match="RGB"):
        features.encoder_features(encoder, images[:, :1])
    with pytest.raises(ValueError, match=r"floats in \[0, 1\]"):
        features.encoder_features(encoder, images.float() / 127.5 - 1)  # the VAE's range
    with pytest.raises(ValueError, match="unknown encoder"):
        features.load_encoder("uni2-h")


def test_interpolant_convention():
    x, eps = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    assert torch.equal(repa_loss.interpolate(x, eps, torch.zeros(3)), x)     # t = 0 is data
    assert torch.equal(repa_loss.interpolate(x, eps, torch.ones(3)), eps)    # t = 1 is noise
    t, h = torch.full((3,), 0.3), 1e-3  # the target is the time derivative of the path
    numeric = (repa_loss.interpolate(x, eps, t + h) - repa_loss.interpolate(x, eps, t)) / h
    torch.testing.assert_close(numeric, repa_loss.velocity_target(x, eps), atol=1e-3, rtol=1e-3)
    t = repa_loss.sample_t(10000)
    assert t.min() >= 0 and t.max() < 1 and abs(t.mean().item() - 0.5) < 0.01


def test_the_projector_reads_the_output_of_block_encoder_depth():
    """REPA aligns the tokens after block `encoder_depth` (8 in SiT-XL/2; 2 in SiT-T/2): the projection must
    be the projector applied to that block's own output, not to its neighbour's."""
    model = sit.build_sit("SiT-T/2", input_size=8, cond_dim=16, z_dim=16).eval()
    with torch.no_grad():
        for p in model.parameters():  # move the zero-initialised adaLN layers so every block changes x
            p.add_(0.05 * torch.randn_like(p))
    outputs = {}
    for i, block in enumerate(model.blocks, start=1):
        block.register_forward_hook(lambda mod, inp, out, i=i: outputs.__setitem__(i, out))
    _, proj = model(torch.randn(2, 4, 8, 8), torch.rand(2), torch.randn(2, 16))
    assert model.encoder_depth == 2
    torch.testing.assert_close(proj, model.projectors[0](outputs[2]))
    assert not torch.allclose(proj, model.projectors[0](outputs[1]), atol=1e-3)
    assert not torch.allclose(proj, model.projectors[0](outputs[3]), atol=1e-3)


def test_posterior_log_variance_is_clamped_to_ldm_range():
    """LDM clamps the encoder's log-variance to [-30, 20] before it reaches the KL and the sample."""
    mean, logvar = torch.zeros(1, 4, 2, 2), torch.tensor([100.0, -100.0, 3.0, 0.0]).view(1, 4, 1, 1).expand(1, 4, 2, 2)
    posterior = vae.DiagonalGaussian(torch.cat([mean, logvar], dim=1))
    assert posterior.logvar[0, :, 0, 0].tolist() == [20.0, -30.0, 3.0, 0.0]
    torch.testing.assert_close(posterior.std[0, :, 0, 0], torch.exp(0.5 * torch.tensor([20.0, -30.0, 3.0, 0.0])))
    expected = 0.5 * (torch.tensor([20.0, -30.0, 3.0, 0.0]).exp() - 1 - torch.tensor([20.0, -30.0, 3.0, 0.0]))
    torch.testing.assert_close(posterior.kl(), (4 * expected.sum()).view(1))
