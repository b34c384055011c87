"""Train the demo text-to-image pipeline on CPU (VAE, then text encoder + UNet).

Stages (``--stage``):

* ``vae``  -- train the ``AutoencoderKL`` (32x32x3 <-> 8x8x4) on rendered
  scenes, then set its ``scaling_factor`` to 1 / std of the latents.
* ``unet`` -- encode a fixed pool of scenes once with the trained VAE, then
  jointly train the CLIP text encoder and the cross-attention UNet as a DDPM
  (epsilon prediction, 10% empty captions for classifier-free guidance), with
  an EMA of both.  The EMA weights are saved as a ``StableDiffusionPipeline``
  (with a DPM-Solver++ scheduler) in ``--out``, also every ``--save-every``
  steps.
* ``all``  -- both, in order.

Example (the command used for the shipped model)::

    python examples/train_demo/train.py --stage all --threads 1 \
        --vae-steps 1200 --unet-steps 2800 \
        --work-dir build/train_demo --out diffusers_mixdq/demo/pipeline
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

import models  # noqa: E402
from diffusers import AutoencoderKL, StableDiffusionPipeline  # noqa: E402
from transformers import CLIPTokenizer  # noqa: E402

from diffusers_mixdq.demo import data  # noqa: E402


def seed_all(seed: int) -> torch.Generator:
    """Seed numpy/torch and return a torch generator for batch sampling."""
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def lr_at(step: int, total: int, base: float, warmup: int = 100) -> float:
    """Linear warm-up then cosine decay to 10% of ``base``."""
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, step: int, max_decay: float) -> None:
    """EMA with the usual warm-up: decay = min(max_decay, (1 + step) / (10 + step))."""
    decay = min(max_decay, (1 + step) / (10 + step))
    for pe, pm in zip(ema.parameters(), model.parameters()):
        pe.lerp_(pm, 1.0 - decay)


# --------------------------------------------------------------------------- #
# VAE
# --------------------------------------------------------------------------- #
def train_vae(args) -> None:
    gen = seed_all(args.seed)
    images = torch.from_numpy(data.render_batch(data.sample_scenes(args.vae_pool, seed=args.seed))) * 2 - 1
    vae = models.build_vae()
    print(f"VAE params: {sum(p.numel() for p in vae.parameters()):,}")
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    t0 = time.time()
    bar = tqdm(range(args.vae_steps), desc="vae", mininterval=5)
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.vae_steps, args.vae_lr)
        x = images[torch.randint(len(images), (args.vae_batch,), generator=gen)]
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen)
        rec = vae.decode(z).sample
        rec_loss = F.mse_loss(rec, x) + 0.1 * F.l1_loss(rec, x)
        kl = post.kl().mean() / z[0].numel()
        loss = rec_loss + args.vae_kl * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == args.vae_steps - 1:
            bar.set_postfix(rec=f"{rec_loss.item():.5f}", kl=f"{kl.item():.3f}")
            tqdm.write(f"vae step {step} rec {rec_loss.item():.5f} kl/elem {kl.item():.4f}")
    vae.eval()
    with torch.no_grad():  # latent statistics -> scaling factor, and a held-out reconstruction error
        held = torch.from_numpy(data.render_batch(data.sample_scenes(480, seed=args.seed + 1))) * 2 - 1
        post = vae.encode(held).latent_dist
        std = post.sample(generator=gen).std().item()
        mse = F.mse_loss(vae.decode(post.mean).sample.clamp(-1, 1), held).item()
    vae.register_to_config(scaling_factor=1.0 / std)
    vae.save_pretrained(os.path.join(args.work_dir, "vae"), safe_serialization=True)
    info = dict(seconds=time.time() - t0, latent_std=std, scaling_factor=1.0 / std, heldout_mse_pm1=mse)
    with open(os.path.join(args.work_dir, "vae_stats.json"), "w") as f:
        json.dump(info, f, indent=2)
    print("VAE done:", info)


# --------------------------------------------------------------------------- #
# Text encoder + UNet
# --------------------------------------------------------------------------- #
def save_pipeline(out: str, vae, text_encoder, tokenizer, unet) -> None:
    """Save the components as a standard StableDiffusionPipeline (safetensors)."""
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=models.build_sample_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(out, safe_serialization=True)
    # keep the human-readable BPE files next to tokenizer.json
    for name in ("vocab.json", "merges.txt"):
        with open(os.path.join(tokenizer.name_or_path, name), "rb") as src, open(
            os.path.join(out, "tokenizer", name), "wb"
        ) as dst:
            dst.write(src.read())


def train_unet(args) -> None:
    gen = seed_all(args.seed)
    tokenizer_dir = os.path.join(args.work_dir, "tokenizer_src")
    models.build_tokenizer(tokenizer_dir)
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)
    vae = AutoencoderKL.from_pretrained(os.path.join(args.work_dir, "vae")).eval()
    sf = vae.config.scaling_factor

    # fixed, balanced pool of scenes, encoded once
    scenes = data.sample_scenes(args.unet_pool, seed=args.seed + 2)
    captions = [s.caption for s in scenes]
    means, stds = [], []
    with torch.no_grad():
        for i in tqdm(range(0, len(scenes), 256), desc="encode pool", mininterval=5):
            x = torch.from_numpy(data.render_batch(scenes[i : i + 256])) * 2 - 1
            post = vae.encode(x).latent_dist
            means.append(post.mean)
            stds.append(post.std)
    means, stds = torch.cat(means), torch.cat(stds)
    tok = lambda texts: tokenizer(  # noqa: E731
        texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids
    ids, empty_ids = tok(captions), tok([""])[0]

    text_encoder = models.build_text_encoder(tokenizer)
    unet = models.build_unet(cross_attention_dim=text_encoder.config.hidden_size)
    print(f"text encoder params: {sum(p.numel() for p in text_encoder.parameters()):,}")
    print(f"UNet params: {sum(p.numel() for p in unet.parameters()):,}")
    ema_te, ema_unet = copy.deepcopy(text_encoder).eval(), copy.deepcopy(unet).eval()
    for p in list(ema_te.parameters()) + list(ema_unet.parameters()):
        p.requires_grad_(False)
    params = list(text_encoder.parameters()) + list(unet.parameters())
    opt = torch.optim.AdamW(params, lr=args.unet_lr, weight_decay=1e-2)
    noise_sched = models.build_train_scheduler()
    alphas = noise_sched.alphas_cumprod

    t0 = time.time()
    running = None
    bar = tqdm(range(args.unet_steps), desc="unet", mininterval=5)
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.unet_steps, args.unet_lr)
        idx = torch.randint(len(scenes), (args.unet_batch,), generator=gen)
        z0 = (means[idx] + stds[idx] * torch.randn(means[idx].shape, generator=gen)) * sf
        batch_ids = ids[idx].clone()
        drop = torch.rand(args.unet_batch, generator=gen) < args.cfg_dropout
        batch_ids[drop] = empty_ids
        noise = torch.randn(z0.shape, generator=gen)
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (args.unet_batch,), generator=gen)
        a = alphas[t].view(-1, 1, 1, 1)
        zt = a.sqrt() * z0 + (1 - a).sqrt() * noise
        cond = text_encoder(batch_ids).last_hidden_state
        pred = unet(zt, t, encoder_hidden_states=cond).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema_update(ema_unet, unet, step, args.ema_decay)
        ema_update(ema_te, text_encoder, step, args.ema_decay)
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if step % 50 == 0 or step == args.unet_steps - 1:
            bar.set_postfix(loss=f"{running:.4f}")
            tqdm.write(f"unet step {step} loss {loss.item():.4f} ema-loss {running:.4f} ({time.time() - t0:.0f}s)")
        if (args.save_every and (step + 1) % args.save_every == 0) or step == args.unet_steps - 1:
            save_pipeline(args.out, vae, ema_te, tokenizer, ema_unet)
            tqdm.write(f"saved pipeline to {args.out} at step {step + 1}")
    info = dict(seconds=time.time() - t0, steps=args.unet_steps, final_ema_loss=running)
    with open(os.path.join(args.work_dir, "unet_stats.json"), "w") as f:
        json.dump(info, f, indent=2)
    print("UNet done:", info)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", choices=["vae", "unet", "all"], default="all")
    p.add_argument("--out", default="diffusers_mixdq/demo/pipeline", help="pipeline output directory")
    p.add_argument("--work-dir", default="build/train_demo", help="intermediate outputs (trained VAE, stats)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vae-steps", type=int, default=1200)
    p.add_argument("--vae-batch", type=int, default=32)
    p.add_argument("--vae-lr", type=float, default=1e-3)
    p.add_argument("--vae-kl", type=float, default=1e-3, help="weight of the per-element KL term")
    p.add_argument("--vae-pool", type=int, default=240 * 16, help="number of rendered training images")
    p.add_argument("--unet-steps", type=int, default=2800)
    p.add_argument("--unet-batch", type=int, default=64)
    p.add_argument("--unet-lr", type=float, default=1e-3)
    p.add_argument("--unet-pool", type=int, default=240 * 32, help="number of encoded training images")
    p.add_argument("--cfg-dropout", type=float, default=0.1, help="probability of an empty caption")
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument("--save-every", type=int, default=500)
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    os.makedirs(args.work_dir, exist_ok=True)
    if args.stage in ("vae", "all"):
        train_vae(args)
    if args.stage in ("unet", "all"):
        train_unet(args)


if __name__ == "__main__":
    main()
