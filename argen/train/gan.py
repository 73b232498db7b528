"""Adversarial loss for tokenizer training (`argen train tokenizer --gan-weight W`).

Why: with MSE alone a decoder that cannot tell which of several plausible images it should draw
outputs their average, i.e. a blur, and the Fashion-MNIST features behind rFID penalise blur. The
usual cure is a perceptual loss plus a GAN (VQGAN, LlamaGen, TiTok's stage 2). No pretrained
perceptual network is available offline (and the shipped fmnist classifier is the evaluation
network: training on it would game the metric), so this is the GAN half only: a small
PatchGAN-style discriminator trained from scratch with the hinge loss, and VQGAN's adaptive weight
on the generator's adversarial term.

Hand-written: no maintained library ships a PatchGAN discriminator or the VQGAN loss
(taming-transformers and LlamaGen are research repositories, not packages); both are a few lines.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

DISC_CHANNELS = 32  # first layer's width; sized for 32x32 grey images and a 1-thread CPU budget
DISC_LAYERS = 2  # stride-2 layers: on 32x32 frames a 6x6 map of logits, each seeing a 34-pixel window
DISC_BETAS = (0.5, 0.9)  # VQGAN's discriminator optimiser


class PatchDiscriminator(nn.Module):
    """PatchGAN layout (as VQGAN's NLayerDiscriminator): `layers` 4x4 stride-2 convs doubling the
    width, one 4x4 stride-1 conv, then a 4x4 conv to one logit per patch. GroupNorm instead of
    BatchNorm, so a logit depends on its own image only (real and fake go through in one batch)."""

    def __init__(self, in_channels: int = 1, channels: int = DISC_CHANNELS, layers: int = DISC_LAYERS):
        super().__init__()
        blocks = [nn.Conv2d(in_channels, channels, 4, 2, 1), nn.LeakyReLU(0.2)]
        width = channels
        for i in range(layers):
            stride = 2 if i < layers - 1 else 1
            out = channels * 2 ** (i + 1)
            blocks += [nn.Conv2d(width, out, 4, stride, 1, bias=False), nn.GroupNorm(8, out), nn.LeakyReLU(0.2)]
            width = out
        blocks.append(nn.Conv2d(width, 1, 4, 1, 1))
        self.net = nn.Sequential(*blocks)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] in [-1, 1] -> logits [B, 1, h, w], one per patch (real > 0 > fake)."""
        return self.net(images)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Discriminator hinge loss: zero once real logits are >= 1 and fake ones <= -1."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def adaptive_weight(nll: torch.Tensor, adversarial: torch.Tensor, last_layer: torch.Tensor) -> torch.Tensor:
    """VQGAN's balance: |d nll / d W| / |d adversarial / d W| at the decoder's last layer W (detached,
    clamped to [0, 1e4]). Times this weight, the adversarial term pushes W as hard as the
    reconstruction loss does, whatever the two losses' scales."""
    g_nll = torch.autograd.grad(nll, last_layer, retain_graph=True)[0]
    g_adv = torch.autograd.grad(adversarial, last_layer, retain_graph=True)[0]
    return (g_nll.norm() / (g_adv.norm() + 1e-4)).clamp(0.0, 1e4).detach()


class AdversarialLoss:
    """The discriminator, its optimiser and the generator's term. Each training step after `start`:
    `discriminator_step(real, recon)` (one hinge-loss update on this batch), then
    `generator_term(recon, nll, last_layer)` through the updated discriminator. `state_dict` /
    `load_state_dict` hold both, so checkpoints resume exactly (`Trainer(extra_modules=...)`).

    The discriminator is built under its own seed (`fork_rng`): the global random stream, and so a
    run's data and restarts, is the same with or without it.
    """

    LOG_NAMES = ["gan_g", "gan_d", "adaptive_weight", "logits_real", "logits_fake"]

    def __init__(self, weight: float, start: int, lr: float, seed: int, in_channels: int = 1,
                 channels: int = DISC_CHANNELS, layers: int = DISC_LAYERS, accelerator=None):
        self.weight = float(weight)
        self.start = int(start)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            disc = PatchDiscriminator(in_channels, channels, layers)
        optimizer = torch.optim.AdamW(disc.parameters(), lr=lr, betas=DISC_BETAS, weight_decay=0.0)
        self.accelerator = accelerator
        if accelerator is not None:  # several processes: gradients averaged like the generator's
            disc, optimizer = accelerator.prepare(disc, optimizer)
        self.disc, self.optimizer = disc, optimizer

    @property
    def module(self) -> PatchDiscriminator:
        return self.accelerator.unwrap_model(self.disc) if self.accelerator is not None else self.disc

    def describe(self) -> dict:
        """For the run record (a resume must agree on it)."""
        m = self.module
        return {"weight": self.weight, "start": self.start, "disc_channels": m.net[0].out_channels,
                "disc_layers": sum(isinstance(b, nn.GroupNorm) for b in m.net), "disc_betas": list(DISC_BETAS),
                "disc_parameters": sum(p.numel() for p in m.parameters())}

    def active(self, step: int) -> bool:
        return step >= self.start

    def discriminator_step(self, real: torch.Tensor, recon: torch.Tensor) -> dict:
        """One update of the discriminator on real images vs (detached) reconstructions."""
        self.disc.train()
        logits = self.disc(torch.cat([real, recon.detach()]))
        logits_real, logits_fake = logits[:len(real)], logits[len(real):]
        loss = hinge_d_loss(logits_real, logits_fake)
        self.optimizer.zero_grad(set_to_none=True)
        if self.accelerator is not None:
            self.accelerator.backward(loss)
        else:
            loss.backward()
        self.optimizer.step()
        return {"gan_d": loss.detach(), "logits_real": logits_real.detach().mean(),
                "logits_fake": logits_fake.detach().mean()}

    def generator_term(self, recon: torch.Tensor, nll: torch.Tensor, last_layer: torch.Tensor) -> tuple:
        """(weight x adaptive x (-mean fake logits), parts): the term the generator adds to its loss.
        The discriminator's parameters take no gradient from it."""
        module = self.module
        module.requires_grad_(False)
        try:
            g_loss = -module(recon).mean()
        finally:
            module.requires_grad_(True)
        adaptive = adaptive_weight(nll, g_loss, last_layer)
        return self.weight * adaptive * g_loss, {"gan_g": g_loss.detach(), "adaptive_weight": adaptive}

    def idle_parts(self) -> dict:
        """Log values before `start` (nothing trained yet)."""
        return {name: torch.zeros(()) for name in self.LOG_NAMES}

    def state_dict(self) -> dict:
        return {"discriminator": self.module.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["discriminator"])
        self.optimizer.load_state_dict(state["optimizer"])


def decoder_last_layer(model) -> Optional[torch.Tensor]:
    """The weight of the layer that outputs pixels (VQ and TiTok: `decoder.conv_out`; FlexTok: the
    velocity head `dec_out`), where the adaptive weight compares gradients; None for a tokenizer
    without one."""
    conv = getattr(getattr(model, "decoder", None), "conv_out", None)
    if isinstance(conv, nn.Conv2d):
        return conv.weight
    head = getattr(model, "dec_out", None)
    return head.weight if isinstance(head, nn.Linear) else None
