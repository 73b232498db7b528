"""FlexTok: an image as an ordered 1D sequence of 1..K tokens, any prefix decodable (apple/ml-flextok).

The official repository ships inference code only; this is argen's own small pixel-space version,
built from the mechanics documented there (registers, FSQ, nested dropout, rectified flow):

    pixels [-1, 1] -> p x p patches -> encoder transformer over [patches, K registers]
        (patches attend to patches; register i attends to every patch and to registers <= i,
        so a prefix of registers never depends on the ones after it)
    -> the K register outputs -> a linear map to len(levels) dims -> FSQ -> codes [B, K]
    decoder: a rectified-flow transformer over [noised patches, K register slots]; slot j holds
        code j's projection when j < k and a learned mask token otherwise; time enters through
        adaLN-Zero; the patch outputs are the velocity v = noise - image.

Training (`forward`): nested dropout keeps the first k registers, k drawn by `nested_dropout` (the
powers of two 1..K, as FlexTok, or uniform over 1..K, each with a long-prefix variant; a share
`nested_full_share` of the images keeps all K on top of that), and with probability `cfg_dropout`
none (the null condition used by classifier-free guidance); the time is
sigma = sigmoid(n), n ~ N(time_mean, 1) (FlexTok: mean 0; lower means train the low-noise end the
last decoding steps use), x_sigma = sigma * noise + (1 - sigma) * image, and the loss is the mean
squared error of the predicted velocity. The first tokens must then carry what matters most, since
they are the only ones the decoder sees at small k. `last_step_images` is what an adversarial loss
judges (`argen/train/gan.py`).

Decoding (`decode`) integrates the flow from pure noise (sigma = 1) to the image (sigma = 0) with
diffusers' `FlowMatchEulerDiscreteScheduler` on uniform sigmas; image i's starting noise comes
from `seeds[i]` only, so an image never depends on its batch. Guidance, when its scale is above
1, runs the decoder once more per step with every register masked (the null condition).

Library parts: FSQ is `vector_quantize_pytorch.FSQ` (its default bound/round/index math is the one
FlexTok uses: tanh bound with the half-level offset for even levels, straight-through rounding,
mixed-radix index); the decoder blocks are diffusers' `AdaLayerNormZero`, `Attention`,
`FeedForward`, `Timesteps`/`TimestepEmbedding` and `AdaLayerNormContinuous`; the encoder blocks are
`nn.TransformerEncoderLayer` (they take the register-causal mask). Only the wiring is written here.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.models.activations import GELU
from diffusers.models.attention import FeedForward
from diffusers.models.attention_processor import Attention
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.normalization import AdaLayerNormContinuous, AdaLayerNormZero
from vector_quantize_pytorch import FSQ

from ..checks import check_number, check_seed
from ..errors import ArgenError
from ..models.base import COMPILE_MODES
from ..models.pretrained import PretrainedMixin
from ..registry import register
from .base import ImageShapeFromConfig, ImageTokenizer
from .layers import image_by_image

# pow2: k uniform over the powers of two; pow2-long: the same values, P(k = 2^i) proportional to i + 1,
# so long prefixes (whose decodes gain least per step of uniform training) get more of the updates;
# uniform: k uniform over 1..K; uniform-long: P(k) proportional to k over 1..K, many distinct long prefixes
# (k > K/2 on ~3/4 of the images), which is what fine-tunes the decoder's tail.
NESTED_DROPOUT_MODES = ("pow2", "pow2-long", "uniform", "uniform-long")


def powers_of_two(limit: int) -> list:
    """1, 2, 4, ... up to `limit`, and `limit` itself (so the full sequence is always trained)."""
    values, k = [], 1
    while k < limit:
        values.append(k)
        k *= 2
    return values + [limit]


def register_causal_mask(num_patches: int, num_registers: int) -> torch.Tensor:
    """Boolean [L, L] mask, True = may NOT attend (nn.TransformerEncoderLayer's convention):
    patches see patches only; register i sees every patch and registers 0..i."""
    n = num_patches + num_registers
    blocked = torch.zeros(n, n, dtype=torch.bool)
    blocked[:num_patches, num_patches:] = True
    blocked[num_patches:, num_patches:] = torch.ones(num_registers, num_registers, dtype=torch.bool).triu(1)
    return blocked


def _decoding(steps, guidance_scale, guidance_start=0) -> tuple:
    """(flow steps, guidance scale, first guided step) checked: an integer >= 1, a number in 0..100
    and an integer >= 0 (past the last step: no step is guided)."""
    return (check_number("flow steps", steps, 1, integer=True),
            check_number("guidance scale", guidance_scale, 0, 100),
            check_number("the first guided flow step", guidance_start, 0, integer=True))


class ImageByImageGELU(GELU):
    """diffusers' GELU (its projection, then tanh-GELU) with the activation taken image by image when
    sampling (`layers.image_by_image`: ATen's tanh-GELU rounds a batch's elements by how the batch splits
    between threads). The same parameters and state dict."""

    def gelu(self, gate: torch.Tensor) -> torch.Tensor:
        return image_by_image(lambda part: F.gelu(part, approximate=self.approximate), gate)


class FlowBlock(nn.Module):
    """DiT block: adaLN-Zero modulation from the time embedding around attention and the MLP."""

    def __init__(self, width: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = AdaLayerNormZero(width)
        self.attn = Attention(query_dim=width, heads=heads, dim_head=width // heads, bias=True, out_bias=True)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.ff = FeedForward(width, mult=mlp_ratio, activation_fn="gelu-approximate")
        self.ff.net[0].__class__ = ImageByImageGELU  # the same module, its activation image by image

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.norm1(x, emb=temb)
        x = x + gate_msa[:, None] * self.attn(h)
        h = self.norm2(x) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
        return x + gate_mlp[:, None] * self.ff(h)


class FlexTokTrainingOutput(NamedTuple):
    """`FlexTokTokenizer.forward`'s result."""
    loss: torch.Tensor  # the flow-matching loss (mean squared velocity error)
    codes: torch.Tensor  # [B, K] the images' codes
    keep: torch.Tensor  # [B] registers kept per image (0: the null condition)
    latent: torch.Tensor  # [B, K, d] the unquantised registers
    last_step: Optional[torch.Tensor]  # [B, C, H, W] `last_step_images`, when asked for (else None)


@register
class FlexTokTokenizer(PretrainedMixin, ModelMixin, ConfigMixin, ImageShapeFromConfig, ImageTokenizer):
    """Images <-> 1..K ordered 1D codes (`grid` is None); `decode` takes any prefix codes[:, :k].

    `flow_steps`, `guidance_scale` and `guidance_start` are the decoding defaults stored with the
    model; `decode` takes others per call (`num_steps=`, `guidance_scale=`, `guidance_start=`), and
    `set_decoding` changes the defaults of a loaded model (the pipeline calls `decode(codes, seeds=...)`
    only). `guidance_start` s leaves the first s Euler steps unguided: one decoder pass each instead
    of two. Guidance matters least at the noisiest steps (docs/history/flextok.md, "Session 15").
    """

    config_name = "config.json"
    accepts_prefixes = True
    # Everything that turns codes into pixels (decoder-only fine-tuning trains these, nothing else).
    decoder_param_prefixes = ("dec_", "mask_token", "time_embed.", "decoder.")
    # A warm start may add decoder blocks after the source's: adaLN-Zero starts each new block as the
    # identity, so the grown model decodes exactly as the source did at step 0.
    growable_blocks = {"dec_layers": "decoder."}

    @register_to_config
    def __init__(self, image_size: int = 32, in_channels: int = 1, patch_size: int = 4, num_registers: int = 32,
                 fsq_levels: Sequence[int] = (8, 5, 5, 5), enc_width: int = 128, enc_layers: int = 4,
                 enc_heads: int = 4, dec_width: int = 128, dec_layers: int = 4, dec_heads: int = 4,
                 mlp_ratio: float = 4.0, nested_dropout: str = "pow2", cfg_dropout: float = 0.1,
                 flow_steps: int = 8, guidance_scale: float = 1.0, time_mean: float = 0.0,
                 nested_full_share: float = 0.0, guidance_start: int = 0):
        super().__init__()
        if patch_size < 1 or image_size % patch_size:
            raise ArgenError(f"patch_size {patch_size} must divide image_size {image_size}")
        for name, width, heads in (("enc", enc_width, enc_heads), ("dec", dec_width, dec_heads)):
            if heads < 1 or width % heads:
                raise ArgenError(f"{name}_width {width} is not divisible by {name}_heads={heads}")
        if num_registers < 1:
            raise ArgenError(f"num_registers must be >= 1, got {num_registers}")
        levels = [int(v) for v in fsq_levels]
        if not levels or min(levels) < 3:
            # vector-quantize-pytorch's default FSQ refuses level 2 (its symmetric variant is other math)
            raise ArgenError(f"fsq_levels must be integers >= 3, got {list(fsq_levels)}")
        if nested_dropout not in NESTED_DROPOUT_MODES:
            raise ArgenError(f"nested_dropout must be one of {', '.join(NESTED_DROPOUT_MODES)}, got {nested_dropout!r}")
        if not 0 <= nested_full_share <= 1:
            raise ArgenError(f"nested_full_share must be in [0, 1], got {nested_full_share}")
        if not 0 <= cfg_dropout < 1:
            raise ArgenError(f"cfg_dropout must be in [0, 1), got {cfg_dropout}")
        self.num_patches = (image_size // patch_size) ** 2
        self.patch_dim = in_channels * patch_size * patch_size
        self.decode_steps, self.decode_guidance, self.decode_guidance_start = _decoding(
            flow_steps, guidance_scale, guidance_start)
        self._compiled_velocity = None  # `velocity` compiled by compile_decoder, used by `decode` only
        # encoder
        self.enc_patch_embed = nn.Linear(self.patch_dim, enc_width)
        self.enc_pos = nn.Parameter(0.02 * torch.randn(self.num_patches, enc_width))
        self.registers = nn.Parameter(0.02 * torch.randn(num_registers, enc_width))
        self.encoder = nn.ModuleList([
            nn.TransformerEncoderLayer(enc_width, enc_heads, int(enc_width * mlp_ratio), dropout=0.0,
                                       activation="gelu", batch_first=True, norm_first=True)
            for _ in range(enc_layers)])
        self.enc_norm = nn.LayerNorm(enc_width)
        self.to_fsq = nn.Linear(enc_width, len(levels))
        # no projections (dim = len(levels)), no persistent buffers. FSQ reads its levels' values as it is
        # built, which the meta device cannot give (argen's size check before training builds models there),
        # so its few buffers are made on the CPU; they move with the model.
        with torch.device("cpu"):
            self.fsq = FSQ(levels)
        self.register_buffer("attn_mask", register_causal_mask(self.num_patches, num_registers), persistent=False)
        # decoder
        self.dec_patch_embed = nn.Linear(self.patch_dim, dec_width)
        self.dec_patch_pos = nn.Parameter(0.02 * torch.randn(self.num_patches, dec_width))
        self.dec_code_embed = nn.Linear(len(levels), dec_width)
        self.dec_register_pos = nn.Parameter(0.02 * torch.randn(num_registers, dec_width))
        self.mask_token = nn.Parameter(0.02 * torch.randn(dec_width))
        self.time_proj = Timesteps(dec_width, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embed = TimestepEmbedding(dec_width, dec_width)
        self.decoder = nn.ModuleList([FlowBlock(dec_width, dec_heads, mlp_ratio) for _ in range(dec_layers)])
        self.dec_norm_out = AdaLayerNormContinuous(dec_width, dec_width, elementwise_affine=False, eps=1e-6)
        self.dec_out = nn.Linear(dec_width, self.patch_dim)
        self._init_weights()

    def _init_weights(self):
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        # adaLN-Zero: every residual branch and the output start at zero (DiT's initialisation)
        for block in self.decoder:
            nn.init.zeros_(block.norm1.linear.weight)
            nn.init.zeros_(block.norm1.linear.bias)
        for layer in (self.dec_norm_out.linear, self.dec_out):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def set_decoding(self, steps: Optional[int] = None, guidance_scale: Optional[float] = None,
                     guidance_start: Optional[int] = None) -> "FlexTokTokenizer":
        """Change the decoding defaults (flow steps, register guidance, first guided step) of this instance."""
        self.decode_steps, self.decode_guidance, self.decode_guidance_start = _decoding(
            self.decode_steps if steps is None else steps,
            self.decode_guidance if guidance_scale is None else guidance_scale,
            self.decode_guidance_start if guidance_start is None else guidance_start)
        return self

    @property
    def decoder_passes(self) -> int:
        """Decoder network passes per image with the current decoding: one per flow step, and one more
        (the null condition's) on each guided step."""
        guided = max(0, self.decode_steps - self.decode_guidance_start) if self.decode_guidance > 1 else 0
        return self.decode_steps + guided

    @property
    def decoding_settings(self) -> dict:
        settings = {"flow_steps": self.decode_steps, "guidance_scale": self.decode_guidance}
        if self.decode_guidance_start:  # only when set, so records of the default stay comparable
            settings["guidance_start"] = self.decode_guidance_start
        return settings

    # ---- ImageTokenizer ------------------------------------------------------------------------

    @property
    def num_tokens(self) -> int:
        return self.config.num_registers

    @property
    def vocab_size(self) -> int:
        return int(self.fsq.codebook_size)

    def codebook_embeddings(self) -> torch.Tensor:
        """[vocab_size, len(levels)]: FSQ's implicit codebook, the grid point of each code."""
        return self.fsq.implicit_codebook.float().clone()

    # ---- patches -------------------------------------------------------------------------------

    def patchify(self, images: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> [B, num_patches, C * p * p], patches in raster order."""
        p = self.config.patch_size
        return F.unfold(images, kernel_size=p, stride=p).transpose(1, 2)

    def unpatchify(self, patches: torch.Tensor) -> torch.Tensor:
        p, s = self.config.patch_size, self.config.image_size
        return F.fold(patches.transpose(1, 2), output_size=(s, s), kernel_size=p, stride=p)

    def _check_images(self, images: torch.Tensor) -> None:
        want = (self.config.in_channels, self.config.image_size, self.config.image_size)
        if images.dim() != 4 or tuple(images.shape[1:]) != want:
            raise ArgenError(f"images must be [B, {want[0]}, {want[1]}, {want[2]}], got {tuple(images.shape)}")

    # ---- encoder -------------------------------------------------------------------------------

    def encode_latent(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] -> the registers before quantisation, [B, K, len(levels)]."""
        b = images.shape[0]
        x = self.enc_patch_embed(self.patchify(images)) + self.enc_pos
        x = torch.cat([x, self.registers.unsqueeze(0).expand(b, -1, -1).to(x.dtype)], dim=1)
        for layer in self.encoder:
            x = layer(x, src_mask=self.attn_mask)
        return self.to_fsq(self.enc_norm(x[:, self.num_patches:]))

    def quantize(self, latent: torch.Tensor):
        """(quantised values [B, K, d] with straight-through gradients, codes [B, K] int64)."""
        values, codes = self.fsq(latent)
        return values, codes.long()

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, C, H, W] in [-1, 1] -> codes [B, K] int64, coarse to fine."""
        self._check_images(images)
        return self.quantize(self.encode_latent(images.to(self.registers.dtype)))[1]

    # ---- decoder -------------------------------------------------------------------------------

    def register_slots(self, values: Optional[torch.Tensor], keep: torch.Tensor, batch: int) -> torch.Tensor:
        """Decoder register inputs [B, K, width]: slot j is code j's projection when j < keep[b]
        (values [B, n, d], n <= K, or None when keep is all 0), else the mask token."""
        k, width = self.config.num_registers, self.config.dec_width
        slots = self.mask_token.expand(batch, k, width)
        if values is not None:
            n = values.shape[1]
            embedded = self.dec_code_embed(values.to(self.mask_token.dtype))
            if n < k:
                embedded = torch.cat([embedded, slots[:, n:]], dim=1)
            kept = torch.arange(k, device=keep.device)[None, :] < keep[:, None]  # [B, K]
            slots = torch.where(kept[..., None], embedded, slots)
        return slots + self.dec_register_pos

    def velocity(self, noisy_patches: torch.Tensor, sigma: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """The decoder: noisy patches [B, P, patch_dim], sigma [B] in [0, 1] (or [1], one flow time for
        every image, embedded once and broadcast by the blocks), register slots [B, K, width] ->
        predicted velocity [B, P, patch_dim]."""
        temb = self.time_embed(self.time_proj(sigma * 1000).to(slots.dtype))
        x = self.dec_patch_embed(noisy_patches) + self.dec_patch_pos
        x = torch.cat([x, slots], dim=1)
        for block in self.decoder:
            x = block(x, temb)
        x = self.dec_norm_out(x[:, :self.num_patches], temb)
        return self.dec_out(x)

    def compile_decoder(self, mode: str = "default") -> "FlexTokTokenizer":
        """torch.compile `velocity` for `decode` (static shapes: one graph per row count, i.e. per batch size
        and guided or not). The decoder is most of flextok-c2i's time at batch 16 and a step of it is a
        few small products and many small ops; fused, a 16-image decode of 4 tokens takes 278 against 368 ms
        (1 thread, AMD EPYC, docs/history/flextok.md, session 23). The images stay within 1e-5 of eager's (a pixel
        in about 17,000 moves by one grey level) and, as eager's, do not depend on the batch (tested).
        max-autotune gained nothing there, so every mode compiles alike."""
        if mode not in COMPILE_MODES:
            raise ArgenError(f"compile mode must be one of {', '.join(COMPILE_MODES)}, got {mode!r}")
        self._compiled_velocity = torch.compile(self.velocity, fullgraph=True, dynamic=False)
        return self

    def null_slots(self, batch: int, device=None) -> torch.Tensor:
        """Register slots of the null condition (every register masked), [B, K, width]."""
        return self.register_slots(None, torch.zeros(batch, dtype=torch.long, device=device), batch)

    def guided_velocity(self, noisy_patches: torch.Tensor, sigma: torch.Tensor, slots: torch.Tensor,
                        scale: float, velocity=None) -> torch.Tensor:
        """The velocity a decoding step follows, float32: with scale > 1, `slots` stacks the condition's
        [B] slots over the null condition's [B] and this is v_null + scale (v_cond - v_null), one
        decoder pass over 2B rows; otherwise one plain pass over [B] slots. `velocity`: the network
        to run (default `self.velocity`; `decode` passes the compiled one)."""
        velocity = velocity or self.velocity
        if scale <= 1.0:
            return velocity(noisy_patches, sigma, slots).float()
        sigma = sigma if sigma.numel() == 1 else torch.cat([sigma, sigma])
        v_cond, v_null = velocity(torch.cat([noisy_patches, noisy_patches]), sigma, slots).float().chunk(2)
        return v_null + scale * (v_cond - v_null)

    def initial_noise(self, seeds: Sequence[int], dtype, device) -> torch.Tensor:
        """[B, P, patch_dim] standard normal noise, row i from a CPU generator seeded with seeds[i]."""
        rows = [torch.randn(self.num_patches, self.patch_dim, generator=torch.Generator().manual_seed(
            check_seed("seed", s))) for s in seeds]
        return torch.stack(rows).to(device=device, dtype=dtype)

    @torch.no_grad()
    def decode(self, codes: torch.Tensor, *, seeds: Optional[Sequence[int]] = None,
               num_steps: Optional[int] = None, guidance_scale: Optional[float] = None,
               guidance_start: Optional[int] = None) -> torch.Tensor:
        """codes [B, k] with 1 <= k <= K (a prefix: the first k tokens) -> images [B, C, H, W] in [-1, 1].

        Image i starts from the noise of seeds[i] (every image from seed 0 when seeds is None), so
        it depends on its codes and seed only, never on the batch. `num_steps` Euler steps of the
        flow (default: `decode_steps`); `guidance_scale` > 1 guides with the null condition (every
        register masked), one more decoder pass per step, from step `guidance_start` on."""
        codes = self.check_codes(codes)
        b, n = codes.shape
        seeds = [0] * b if seeds is None else list(seeds)
        if len(seeds) != b:
            raise ArgenError(f"got {len(seeds)} seeds for {b} images")
        steps, scale, start = _decoding(self.decode_steps if num_steps is None else num_steps,
                                        self.decode_guidance if guidance_scale is None else guidance_scale,
                                        self.decode_guidance_start if guidance_start is None else guidance_start)
        dtype, device = self.mask_token.dtype, self.mask_token.device
        values = self.fsq.indices_to_codes(codes.to(device)).to(dtype)  # [B, n, d]
        slots = self.register_slots(values, torch.full((b,), n, device=device), b)
        both = torch.cat([slots, self.null_slots(b, device)]) if scale > 1.0 and start < steps else None
        x = self.initial_noise(seeds, torch.float32, device)
        # imported here: diffusers' scheduler module imports scipy.stats (0.6-0.8 s), which every argen command
        # would otherwise pay at start, FlexTok or not
        from diffusers import FlowMatchEulerDiscreteScheduler

        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000)
        # uniform sigmas 1, 1 - 1/T, ..., 1/T (then 0): T equal Euler steps, the integration FlexTok uses
        scheduler.set_timesteps(sigmas=[1.0 - i / steps for i in range(steps)], device=device)
        for i, t in enumerate(scheduler.timesteps):
            # one flow time for the batch: the time embedding's and the modulations' products then have one
            # row at any batch, so an image decodes alike alone or in a batch (MKL rounds products of under
            # 4 rows apart from larger ones: rows 1-3 against 64 differ by 1e-5; B rows made decodes differ
            # by up to 1.1e-5)
            sigma = torch.full((1,), float(t) / 1000, device=device)
            guided = both is not None and i >= start
            v = self.guided_velocity(x.to(dtype), sigma, both if guided else slots, scale if guided else 1.0,
                                     velocity=self._compiled_velocity)
            x = scheduler.step(v, t, x, return_dict=False)[0]
        return self.unpatchify(x).clamp(-1, 1)

    # ---- training ------------------------------------------------------------------------------

    def sample_keep(self, batch: int, device=None) -> torch.Tensor:
        """How many registers each training image keeps (`NESTED_DROPOUT_MODES`), and 0 (the null
        condition) with probability cfg_dropout. Uses the global RNG (the trainer checkpoints it)."""
        k = self.config.num_registers
        mode = self.config.nested_dropout
        if mode in ("pow2", "pow2-long"):
            choices = torch.tensor(powers_of_two(k))
            pick = (torch.randint(0, len(choices), (batch,)) if mode == "pow2"
                    else torch.multinomial(torch.arange(1.0, len(choices) + 1), batch, replacement=True))
            keep = choices[pick]
        elif mode == "uniform-long":
            keep = 1 + torch.multinomial(torch.arange(1.0, k + 1), batch, replacement=True)
        else:
            keep = torch.randint(1, k + 1, (batch,))
        if self.config.nested_full_share > 0:
            # the full sequence on a fixed share of the images: the operating point every finer
            # prefix length approaches, which the modes above give 3% (uniform) to 29% (pow2-long)
            keep = torch.where(torch.rand(batch) < self.config.nested_full_share, torch.full_like(keep, k), keep)
        if self.config.cfg_dropout > 0:
            keep = torch.where(torch.rand(batch) < self.config.cfg_dropout, torch.zeros_like(keep), keep)
        return keep.to(device)

    def last_step_images(self, x0: torch.Tensor, noise: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """Where the stored decoding's last Euler step lands when it starts from the true noisy image
        at its sigma s = 1 / `decode_steps`: x_s - s v, v guided as stored. x0, noise: [B, P, patch_dim]
        patches; slots: the condition's [B, K, width]. Differentiable: the adversarial loss
        (`argen train tokenizer --arch flextok --gan-weight`) judges the decoder by these images,
        the step at which a blurred average would otherwise become the decoded image."""
        b, s = x0.shape[0], 1.0 / self.decode_steps
        scale = self.decode_guidance if self.decode_guidance_start < self.decode_steps else 1.0  # last step guided?
        if scale > 1.0:
            slots = torch.cat([slots, self.null_slots(b, x0.device)])
        x_s = s * noise + (1 - s) * x0
        v = self.guided_velocity(x_s, torch.full((1,), s, device=x0.device), slots, scale)  # as `decode`: one time
        return self.unpatchify(x_s - s * v)

    def forward(self, images: torch.Tensor, keep: Optional[torch.Tensor] = None,
                last_step: bool = False) -> FlexTokTrainingOutput:
        """Training step on [-1, 1] images (`FlexTokTrainingOutput`). `keep` defaults to
        `sample_keep`; `last_step`: also return `last_step_images` on the same noise and slots."""
        b = images.shape[0]
        latent = self.encode_latent(images)
        values, codes = self.quantize(latent)
        keep = self.sample_keep(b, images.device) if keep is None else keep
        slots = self.register_slots(values, keep, b)
        x0 = self.patchify(images)
        noise = torch.randn_like(x0)
        # logit-normal times; time_mean > 0 trains more at high noise, where only the registers inform
        sigma = torch.sigmoid(torch.randn(b, device=images.device) + self.config.time_mean)
        s = sigma[:, None, None]
        v = self.velocity(s * noise + (1 - s) * x0, sigma, slots)
        loss = F.mse_loss(v, noise - x0)
        return FlexTokTrainingOutput(loss, codes, keep, latent,
                                     self.last_step_images(x0, noise, slots) if last_step else None)
