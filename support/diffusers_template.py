"""The two classes of the release's diffusers format, written once (CytoSyn §3.1, §4.1): the transformer around the
SiT, and the pipeline called with the released CytoSyn pipeline's keywords (as LazySlide calls it).

This file is text for support/diffusers_format.py, which ships it after the project's own sources that it uses:
the transformer's file after sit.py (`SiT`), the pipeline's after vae.py (`AutoencoderKL`,
`convert_diffusers_state_dict`, `to_pixels`), sampler.py (`euler_maruyama_sampler`, `euler_sampler`,
`standard_normal`) and sample.py's `noise_seed`. So an export runs where this repository is not installed, and the
code it runs is the code tested here. It is never imported in the repository.

The pipeline gives sample.py's pixels bit for bit: the same jobs (row i of h0_mini_embeds, image k: noise id
i * num_images_per_prompt + k), batches, seeds, sampler and decoding. diffusers' AutoencoderKL and ours (LDM)
round the attention differently (a Linear against a 1x1 convolution), so the `vae` component, a plain diffusers
AutoencoderKL, is decoded through the shipped copy of our VAE with its weights converted.

Left out: tile conditioning and restaining (sample.py's: they need the H0-mini encoder), schedulers (the sampler
is CytoSyn's, not a diffusers scheduler).
"""
# ruff: noqa: F821  (SiT, the sampler and the VAE functions are the project's sources, shipped above this text)
from contextlib import nullcontext

import numpy as np
import torch
from diffusers import ConfigMixin, DiffusionPipeline, ModelMixin
from diffusers.configuration_utils import register_to_config
from PIL import Image


class CytoSynTransformer(ModelMixin, ConfigMixin):
    """CytoSyn's SiT as a diffusers model: config.json holds its architecture, the weights are the SiT's under
    `sit.` with REPA-E's names, the latent BatchNorm statistics included (decoding denormalises with them)."""

    @register_to_config
    def __init__(self, input_size, in_channels, cond_dim, encoder_depth, z_dim, projector_dim, depth, hidden_size,
                 patch_size, num_heads):
        super().__init__()
        self.sit = SiT(input_size=input_size, in_channels=in_channels, cond_dim=cond_dim, encoder_depth=encoder_depth,
                       z_dim=z_dim, projector_dim=projector_dim, depth=depth, hidden_size=hidden_size,
                       patch_size=patch_size, num_heads=num_heads)

    def forward(self, x, t, cond=None, drop=None):
        """The velocity (B, C, H, W) at the normalised latent x_t, t (B,) in [0, 1] (t = 0 data, t = 1 noise)."""
        return self.sit(x, t, cond, drop)[0]


class CytoSynPipeline(DiffusionPipeline):
    """pipe(h0_mini_embeds=(N, 768) or None, num_images_per_prompt, num_inference_steps, guidance_scale,
    guidance_low, guidance_high, seed)["images"]: N x num_images_per_prompt PIL tiles, embed by embed."""

    model_cpu_offload_seq = "transformer->vae"

    def __init__(self, transformer, vae):
        super().__init__()
        self.register_modules(transformer=transformer, vae=vae)

    def ldm_vae(self):
        """The `vae` component's weights in the shipped LDM AutoencoderKL (see the file's docstring)."""
        widths = list(self.vae.config.block_out_channels)
        ldm = AutoencoderKL(ch=widths[0], ch_mult=[w // widths[0] for w in widths],
                            num_res_blocks=self.vae.config.layers_per_block, z_channels=self.vae.config.latent_channels)
        ldm.load_state_dict(convert_diffusers_state_dict(self.vae.state_dict()))
        return ldm.to(self.vae.device, self.vae.dtype).eval()

    def embeddings(self, h0_mini_embeds):
        """(N, D) CLS features as float32, or None; LazySlide's (N, 2 D) CLS + mean patch token: its first D."""
        if h0_mini_embeds is None:
            return None
        dim = self.transformer.config.cond_dim
        arr = (h0_mini_embeds.detach().float().cpu().numpy() if torch.is_tensor(h0_mini_embeds)
               else np.asarray(h0_mini_embeds, dtype=np.float32))
        arr = arr[None] if arr.ndim == 1 else arr
        arr = arr[:, :dim] if arr.ndim == 2 and arr.shape[1] == 2 * dim else arr
        if arr.ndim != 2 or arr.shape[1] != dim or not len(arr):
            raise ValueError(f"h0_mini_embeds has shape {arr.shape}; this model needs (N, {dim}) H0-mini CLS features")
        return arr

    @torch.no_grad()
    def __call__(self, h0_mini_embeds=None, num_images_per_prompt=1, num_inference_steps=250, guidance_scale=2.5,
                 guidance_low=0.0, guidance_high=0.75, seed=0, batch_size=32, sampler="sde"):
        if sampler not in ("sde", "ode", "heun") or not 0 <= guidance_low <= guidance_high <= 1:
            raise ValueError(f"sampler is sde, ode or heun (got {sampler!r}); 0 <= guidance_low <= guidance_high <= 1 "
                             f"(got {guidance_low}, {guidance_high})")
        embeds, n = self.embeddings(h0_mini_embeds), int(num_images_per_prompt)
        rows = [None] * n if embeds is None else [i for i in range(len(embeds)) for _ in range(n)]  # job j: noise id j
        sit, device, vae = self.transformer.sit, self._execution_device, self.ldm_vae()
        precision = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
        guidance = dict(num_steps=num_inference_steps, cfg_scale=guidance_scale, guidance_low=guidance_low,
                        guidance_high=guidance_high)
        images = []
        for start in self.progress_bar(range(0, len(rows), batch_size)):
            ids = list(range(start, min(start + batch_size, len(rows))))
            gens = [torch.Generator(device).manual_seed(noise_seed(seed, i)) for i in ids]
            x = standard_normal((len(ids), sit.in_channels, sit.input_size, sit.input_size), gens, device)
            cond = None if embeds is None else torch.from_numpy(embeds[[rows[i] for i in ids]]).to(device)
            with precision:  # the network in bf16 on a GPU, as sample.py's default; the sampler state float64
                if sampler == "sde":
                    x = euler_maruyama_sampler(self.transformer, x, cond, generator=gens, **guidance)
                else:
                    x = euler_sampler(self.transformer, x, cond, heun=sampler == "heun", **guidance)
            pixels = to_pixels(vae.decode(sit.denormalize(x.float()))).cpu().numpy()  # float32 decoding
            images += [Image.fromarray(image) for image in pixels]
        return {"images": images}
