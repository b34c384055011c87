"""Train the ``scenes`` demo pipeline on CPU: VAE, then T5 text encoder + PixArt transformer.

Stages (``--stage``):

* ``vae`` -- train the ``AutoencoderKL`` (32x32x3 <-> 8x8x4) on rendered
  two-object scenes; its ``scaling_factor`` is set to 1 / std of the latents.
* ``dit`` -- encode a fixed pool of scenes once with the trained VAE, then
  jointly train the T5 text encoder and the ``PixArtTransformer2DModel`` as a
  DDPM (epsilon prediction, ``--cfg-dropout`` empty captions for
  classifier-free guidance), with an EMA of both.  The EMA weights are saved
  as a ``PixArtSigmaPipeline`` in ``--out`` at the end, and under
  ``<work-dir>/exports/step<N>`` every ``--export-every`` steps.
* ``all`` -- both.

Resuming: every ``--ckpt-every`` steps the complete training state (models,
EMA, optimizer, RNG, step) is written atomically to ``<work-dir>/ckpt_<stage>.pt``;
re-running the same command continues from there (a finished VAE stage is
skipped).  Kill it at any moment.

Phase-2 options (used for the shipped model, see its model card): ``--init-from``
(start from another run's EMA weights), ``--role-tokens`` (the tokenizer gives the
second object's words their own ids), ``--curriculum-steps`` (first train on
"left of"/"above" captions only), ``--high-noise-weight`` (weight each sample's
epsilon MSE by ``clamp(1/SNR, 1, W)``; this is what made the model learn the order
of the two objects).  ``--stop-at`` replays a run whose ``--steps`` was changed
mid-way.

The exact commands that produced ``diffusers_mixdq/demo/scenes/pipeline`` are in
its ``README.md`` (about 80 min on one CPU thread in all).
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

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

import models  # noqa: E402
from diffusers import AutoencoderKL, PixArtSigmaPipeline  # noqa: E402
from transformers import PreTrainedTokenizerFast  # noqa: E402

from diffusers_mixdq.demo import scenes_data as data  # noqa: E402


def log(msg: str) -> None:
    print(time.strftime("%H:%M:%S"), msg, flush=True)


def lr_at(step: int, total: int, base: float, warmup: int = 200) -> float:
    """Linear warm-up then cosine decay to 10% of ``base``."""
    if step < warmup:
        return base * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, step: int, max_decay: float) -> None:
    decay = min(max_decay, (1 + step) / (10 + step))
    for pe, pm in zip(ema.parameters(), model.parameters()):
        pe.lerp_(pm, 1.0 - decay)


def atomic_save(obj, path: str) -> None:
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


# --------------------------------------------------------------------------- #
# VAE
# --------------------------------------------------------------------------- #
def train_vae(args) -> None:
    vae_dir = os.path.join(args.work_dir, "vae")
    if os.path.exists(os.path.join(vae_dir, "config.json")):
        log(f"VAE already trained in {vae_dir}; skipping")
        return
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    images = torch.from_numpy(data.render_batch(data.sample_scenes(args.vae_pool, seed=args.seed))) * 2 - 1
    vae = models.build_vae()
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    ckpt_path = os.path.join(args.work_dir, "ckpt_vae.pt")
    start, elapsed = 0, 0.0
    if os.path.exists(ckpt_path):
        ck = torch.load(ckpt_path, weights_only=False)
        vae.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        gen.set_state(ck["gen"])
        start, elapsed = ck["step"], ck["elapsed"]
        log(f"resumed VAE at step {start}")
    log(f"VAE params: {sum(p.numel() for p in vae.parameters()):,}")
    t0 = time.time() - elapsed
    for step in range(start, args.vae_steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.vae_steps, args.vae_lr, warmup=100)
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
        if step % 100 == 0 or step == args.vae_steps - 1:
            log(f"vae step {step} rec {rec_loss.item():.5f} kl/elem {kl.item():.4f} ({time.time() - t0:.0f}s)")
        if (step + 1) % args.ckpt_every == 0:
            atomic_save(dict(model=vae.state_dict(), opt=opt.state_dict(), gen=gen.get_state(), step=step + 1,
                             elapsed=time.time() - t0), ckpt_path)  # fmt: skip
    vae.eval()
    with torch.no_grad():
        held = torch.from_numpy(data.render_batch(data.sample_scenes(480, seed=args.seed + 1))) * 2 - 1
        post = vae.encode(held).latent_dist
        std = post.sample(generator=gen).std().item()
        mse = F.mse_loss(vae.decode(post.mean).sample.clamp(-1, 1), held).item()
    vae.register_to_config(scaling_factor=1.0 / std)
    vae.save_pretrained(vae_dir, safe_serialization=True)
    info = dict(seconds=time.time() - t0, steps=args.vae_steps, latent_std=std, scaling_factor=1.0 / std,
                heldout_mse_pm1=mse)  # fmt: skip
    with open(os.path.join(args.work_dir, "vae_stats.json"), "w") as f:
        json.dump(info, f, indent=2)
    log(f"VAE done: {info}")


# --------------------------------------------------------------------------- #
# Text encoder + transformer
# --------------------------------------------------------------------------- #
def save_pipeline(out: str, vae, text_encoder, tokenizer, transformer) -> None:
    pipe = PixArtSigmaPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
        scheduler=models.build_sample_scheduler(),
    )  # fmt: skip
    pipe.save_pretrained(out, safe_serialization=True)
    models.fix_tokenizer_class(os.path.join(out, "tokenizer"))
    index_path = os.path.join(out, "model_index.json")
    with open(index_path) as f:
        index = json.load(f)
    index["tokenizer"] = ["transformers", "PreTrainedTokenizerFast"]
    with open(index_path, "w") as f:
        json.dump(index, f, indent=2)


def encode_text(text_encoder, ids, mask):
    """Exactly what ``PixArtSigmaPipeline.encode_prompt`` does."""
    return text_encoder(ids, attention_mask=mask)[0]


def init_from(path, tokenizer, text_encoder, transformer, ema_te, ema_tr, role_noise: float = 1.0) -> None:
    """Start from the EMA weights of another run's ``ckpt_dit.pt`` (model and EMA both).

    When the tokenizer has more tokens than that run's text encoder (``--role-tokens``
    added role-2 words), the new embedding rows are copies of their plain words' rows,
    plus Gaussian noise of std ``role_noise`` x the embedding std.  The noise matters: with exact
    copies the two roles start symmetric, and because which side an object goes to depends on
    role XOR relation ("left of" vs "right of"), the gradient that would tell them apart averages
    to zero -- a saddle the model did not leave in 1,000 steps.
    """
    ck = torch.load(path, weights_only=False)
    g = torch.Generator().manual_seed(1234)
    te_state = dict(ck["ema_te"])
    vocab = tokenizer.get_vocab()
    keys = [k for k in te_state if k.endswith("shared.weight") or k.endswith("embed_tokens.weight")]
    old = te_state[keys[0]]  # tied: every key holds the same matrix
    if old.shape[0] < len(vocab):
        new = torch.zeros(len(vocab), old.shape[1], dtype=old.dtype)
        new[: old.shape[0]] = old
        scale = role_noise * old.std().item()
        for tok, i in sorted(vocab.items(), key=lambda kv: kv[1]):
            if i >= old.shape[0]:
                base = old[vocab[tok[len(models.ROLE2_PREFIX) :]]]
                new[i] = base + scale * torch.randn(old.shape[1], generator=g)
        for k in keys:
            te_state[k] = new
    for m in (text_encoder, ema_te):
        m.load_state_dict(te_state)
    for m in (transformer, ema_tr):
        m.load_state_dict(ck["ema_tr"])


def train_dit(args) -> None:
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed + 7)
    tokenizer = models.build_tokenizer(os.path.join(args.work_dir, "tokenizer_src"), role_tokens=args.role_tokens)
    vae = AutoencoderKL.from_pretrained(args.vae_dir or os.path.join(args.work_dir, "vae")).eval()
    sf = vae.config.scaling_factor

    cache = os.path.join(args.work_dir, f"latents_{args.dit_pool}.pt")
    if os.path.exists(cache):
        pool = torch.load(cache)
        means, stds, captions = pool["means"], pool["stds"], pool["captions"]
    else:
        scenes = data.sample_scenes(args.dit_pool, seed=args.seed + 2)
        captions = [s.caption for s in scenes]
        ms, ss = [], []
        with torch.no_grad():
            for i in range(0, len(scenes), 256):
                x = torch.from_numpy(data.render_batch(scenes[i : i + 256])) * 2 - 1
                post = vae.encode(x).latent_dist
                ms.append(post.mean)
                ss.append(post.std)
        means, stds = torch.cat(ms), torch.cat(ss)
        atomic_save(dict(means=means, stds=stds, captions=captions), cache)
        log(f"encoded {len(captions)} scenes")

    def tok(texts):
        enc = tokenizer(texts, padding="max_length", max_length=models.MAX_SEQUENCE_LENGTH, truncation=True,
                        add_special_tokens=True, return_tensors="pt")  # fmt: skip
        return enc.input_ids, enc.attention_mask

    ids, masks = tok(captions)
    easy = torch.tensor(
        [i for i, c in enumerate(captions) if data.parse_caption(c)["relation"] in ("left of", "above")]
    )
    empty_ids, empty_mask = tok([""])

    text_encoder = models.build_text_encoder(len(tokenizer), d_model=args.text_width, layers=args.text_layers)
    transformer = models.build_transformer(
        caption_channels=args.text_width, width=args.width, depth=args.depth, heads=args.heads,
        patch_size=args.patch_size,
    )  # fmt: skip
    log(f"text encoder params: {sum(p.numel() for p in text_encoder.parameters()):,}")
    log(f"transformer params: {sum(p.numel() for p in transformer.parameters()):,}")
    ema_te, ema_tr = copy.deepcopy(text_encoder).eval(), copy.deepcopy(transformer).eval()
    for p in list(ema_te.parameters()) + list(ema_tr.parameters()):
        p.requires_grad_(False)
    params = list(text_encoder.parameters()) + list(transformer.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-2)
    alphas = models.build_train_scheduler().alphas_cumprod

    ckpt_path = os.path.join(args.work_dir, "ckpt_dit.pt")
    start, elapsed, running = 0, 0.0, None
    ema_offset = 0
    if args.init_from and not os.path.exists(ckpt_path):
        init_from(args.init_from, tokenizer, text_encoder, transformer, ema_te, ema_tr)
        ema_offset = 10**6  # continue the (already warm) EMA at full decay
        log(f"initialised from the EMA weights in {args.init_from}")
    elif args.init_from:
        ema_offset = 10**6
    if os.path.exists(ckpt_path):
        ck = torch.load(ckpt_path, weights_only=False)
        text_encoder.load_state_dict(ck["te"])
        transformer.load_state_dict(ck["tr"])
        ema_te.load_state_dict(ck["ema_te"])
        ema_tr.load_state_dict(ck["ema_tr"])
        opt.load_state_dict(ck["opt"])
        gen.set_state(ck["gen"])
        start, elapsed, running = ck["step"], ck["elapsed"], ck["running"]
        log(f"resumed DiT training at step {start}")
    t0 = time.time() - elapsed
    transformer.train()
    text_encoder.train()
    added = {"resolution": None, "aspect_ratio": None}
    for step in range(start, args.steps):
        if args.stop_at is not None and step >= args.stop_at:
            atomic_save(dict(te=text_encoder.state_dict(), tr=transformer.state_dict(), ema_te=ema_te.state_dict(),
                             ema_tr=ema_tr.state_dict(), opt=opt.state_dict(), gen=gen.get_state(), step=step,
                             elapsed=time.time() - t0, running=running), ckpt_path)  # fmt: skip
            log(f"stopped at step {step} (--stop-at); checkpoint saved, nothing exported")
            return
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.steps, args.lr, warmup=args.warmup)
        if step < args.curriculum_steps:  # only "left of" / "above": the first-named object goes left / top
            idx = easy[torch.randint(len(easy), (args.batch,), generator=gen)]
        else:
            idx = torch.randint(len(captions), (args.batch,), generator=gen)
        z0 = (means[idx] + stds[idx] * torch.randn(means[idx].shape, generator=gen)) * sf
        b_ids, b_mask = ids[idx].clone(), masks[idx].clone()
        drop = torch.rand(args.batch, generator=gen) < args.cfg_dropout
        b_ids[drop], b_mask[drop] = empty_ids, empty_mask
        noise = torch.randn(z0.shape, generator=gen)
        t = torch.randint(0, 1000, (args.batch,), generator=gen)
        a = alphas[t].view(-1, 1, 1, 1)
        zt = a.sqrt() * z0 + (1 - a).sqrt() * noise
        cond = encode_text(text_encoder, b_ids, b_mask)
        pred = transformer(zt, encoder_hidden_states=cond, encoder_attention_mask=b_mask, timestep=t,
                           added_cond_kwargs=added, return_dict=False)[0]  # fmt: skip
        if args.high_noise_weight > 1:
            # per-sample weight min(1/SNR, cap), at least 1: the epsilon loss barely rewards a correct
            # x0 at high noise (error scaled by SNR), which is where the layout is decided
            w = ((1 - a) / a).view(-1).clamp(1.0, args.high_noise_weight)
            loss = ((pred - noise).pow(2).mean(dim=(1, 2, 3)) * w).sum() / w.sum()
        else:
            loss = F.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema_update(ema_tr, transformer, step + ema_offset, args.ema_decay)
        ema_update(ema_te, text_encoder, step + ema_offset, args.ema_decay)
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if step % 50 == 0 or step == args.steps - 1:
            log(f"dit step {step} loss {loss.item():.4f} ema-loss {running:.4f} ({time.time() - t0:.0f}s)")
        if (step + 1) % args.ckpt_every == 0:
            atomic_save(dict(te=text_encoder.state_dict(), tr=transformer.state_dict(), ema_te=ema_te.state_dict(),
                             ema_tr=ema_tr.state_dict(), opt=opt.state_dict(), gen=gen.get_state(), step=step + 1,
                             elapsed=time.time() - t0, running=running), ckpt_path)  # fmt: skip
        if args.export_every and (step + 1) % args.export_every == 0:
            save_pipeline(os.path.join(args.work_dir, "exports", f"step{step + 1}"), vae, ema_te, tokenizer, ema_tr)
            log(f"exported step {step + 1}")
    save_pipeline(args.out, vae, ema_te, tokenizer, ema_tr)
    info = dict(seconds=time.time() - t0, steps=args.steps, final_ema_loss=running, batch=args.batch, lr=args.lr,
                width=args.width, depth=args.depth, heads=args.heads, patch_size=args.patch_size,
                text_width=args.text_width, text_layers=args.text_layers, pool=args.dit_pool)  # fmt: skip
    with open(os.path.join(args.work_dir, "dit_stats.json"), "w") as f:
        json.dump(info, f, indent=2)
    log(f"DiT done: {info}; saved pipeline to {args.out}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", choices=["vae", "dit", "all"], default="all")
    p.add_argument("--out", default="diffusers_mixdq/demo/scenes/pipeline")
    p.add_argument("--work-dir", default="_work/train_scenes")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vae-steps", type=int, default=1500)
    p.add_argument("--vae-batch", type=int, default=32)
    p.add_argument("--vae-lr", type=float, default=1e-3)
    p.add_argument("--vae-kl", type=float, default=1e-3)
    p.add_argument("--vae-pool", type=int, default=1440 * 4)
    p.add_argument("--steps", type=int, default=4000)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--dit-pool", type=int, default=1440 * 10)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--depth", type=int, default=6)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--patch-size", type=int, default=1)
    p.add_argument("--text-width", type=int, default=64)
    p.add_argument("--text-layers", type=int, default=2)
    p.add_argument("--cfg-dropout", type=float, default=0.1)
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument("--ckpt-every", type=int, default=100)
    p.add_argument("--role-tokens", action="store_true",
                   help="tokenizer marks the second object's words with role-2 tokens (see models.build_tokenizer)")
    p.add_argument("--init-from", default=None,
                   help="ckpt_dit.pt of an earlier run: start from its EMA weights (phase 2 fine-tuning)")
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--vae-dir", default=None, help="trained VAE for --stage dit (default: <work-dir>/vae)")
    p.add_argument("--high-noise-weight", type=float, default=0.0,
                   help="weight each sample's epsilon MSE by min(1/SNR, this), at least 1 (0: unweighted)")
    p.add_argument("--curriculum-steps", type=int, default=0,
                   help="train only on 'left of' / 'above' captions for this many steps first")
    p.add_argument("--stop-at", type=int, default=None,
                   help="save a checkpoint and stop at this step (to replay the shipped run's schedule changes)")
    p.add_argument("--export-every", type=int, default=500)
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    os.makedirs(args.work_dir, exist_ok=True)
    if args.stage in ("vae", "all"):
        train_vae(args)
    if args.stage in ("dit", "all"):
        train_dit(args)


if __name__ == "__main__":
    main()
