"""Train the ``scenes`` attribute scorer (layout axis + both objects' colour and shape).

Trains :class:`diffusers_mixdq.demo.scenes_scorer.SceneCNN` on rendered
two-object scenes with light augmentation (blur, noise, brightness/contrast,
per-channel gain) so it tolerates the softness of generated images, reports
accuracy on held-out renders (different seed) and writes ``config.json`` +
``model.safetensors``.

Example (the command used for the shipped scorer)::

    OMP_NUM_THREADS=1 python examples/train_scenes/train_scorer.py --threads 1 \
        --out diffusers_mixdq/demo/scenes/scorer
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

from diffusers_mixdq.demo import scenes_data as data  # noqa: E402
from diffusers_mixdq.demo.scenes_scorer import SceneCNN, SceneScorer  # noqa: E402


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random blur / noise / brightness-contrast / channel gain on images in [0, 1] (N, 3, H, W)."""
    n = len(x)
    sigma = torch.rand(n, generator=gen) * 1.0
    k = torch.arange(-2, 3, dtype=torch.float32)
    w = torch.exp(-(k[None] ** 2) / (2 * sigma[:, None].clamp_min(1e-3) ** 2))
    w = w / w.sum(1, keepdim=True)
    xp = F.pad(x, (2, 2, 2, 2), mode="replicate")
    xb = sum(w[:, i].view(n, 1, 1, 1) * xp[:, :, :, i : i + x.shape[-1]] for i in range(5))
    xb = sum(w[:, i].view(n, 1, 1, 1) * xb[:, :, i : i + x.shape[-2], :] for i in range(5))
    scale = 0.85 + 0.3 * torch.rand(n, 1, 1, 1, generator=gen)
    gain = 1.0 + 0.08 * (torch.rand(n, 3, 1, 1, generator=gen) - 0.5)
    offset = 0.06 * (torch.rand(n, 1, 1, 1, generator=gen) - 0.5)
    noise = torch.randn(x.shape, generator=gen) * (0.05 * torch.rand(n, 1, 1, 1, generator=gen))
    return (xb * scale * gain + offset + noise).clamp(0, 1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="diffusers_mixdq/demo/scenes/scorer")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=2500)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--pool", type=int, default=1440 * 12, help="number of rendered training images")
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--feature-dim", type=int, default=128)
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    t0 = time.time()
    train_scenes = data.sample_scenes(args.pool, seed=1000 + args.seed)
    x_train = torch.from_numpy(data.render_batch(train_scenes))
    y_train = torch.from_numpy(data.canonical_labels_array(train_scenes))
    test_scenes = data.sample_scenes(2880, seed=2000 + args.seed)  # held out: different layouts and order
    x_test = torch.from_numpy(data.render_batch(test_scenes))
    test_prompts = [s.caption for s in test_scenes]

    num_classes = {a: len(data.CANONICAL_VALUES[a]) for a in data.CANONICAL_ATTRIBUTES}
    model = SceneCNN(width=args.width, feature_dim=args.feature_dim, num_classes=num_classes)
    print(f"scorer params: {sum(q.numel() for q in model.parameters()):,}", flush=True)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.steps, pct_start=0.1)
    for step in range(args.steps):
        idx = torch.randint(len(x_train), (args.batch,), generator=gen)
        x = augment(x_train[idx], gen) * 2 - 1
        logits = model(x)
        loss = sum(F.cross_entropy(logits[a], y_train[idx, i]) for i, a in enumerate(data.CANONICAL_ATTRIBUTES))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 250 == 0 or step == args.steps - 1:
            print(f"scorer step {step} loss {loss.item():.4f} ({time.time() - t0:.0f}s)", flush=True)

    model.eval()
    scorer = SceneScorer(model)
    clean = scorer.score(x_test, test_prompts)
    noisy = scorer.score(augment(x_test, torch.Generator().manual_seed(7)), test_prompts)
    clean.pop("aligned")
    noisy.pop("aligned")
    print("held-out accuracy (clean):", clean)
    print("held-out accuracy (augmented):", noisy)

    os.makedirs(args.out, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, os.path.join(args.out, "model.safetensors"))
    config = dict(
        architecture="SceneCNN",
        width=args.width,
        feature_dim=args.feature_dim,
        image_size=data.IMAGE_SIZE,
        input_range="[-1, 1] (SceneScorer converts from [0, 1])",
        attributes=list(data.CANONICAL_ATTRIBUTES),
        num_classes=num_classes,
        classes={a: list(data.CANONICAL_VALUES[a]) for a in data.CANONICAL_ATTRIBUTES},
        heldout_accuracy=clean,
        heldout_accuracy_augmented=noisy,
        train=dict(steps=args.steps, batch=args.batch, lr=args.lr, pool=args.pool, seed=args.seed,
                   seconds=round(time.time() - t0, 1)),
    )  # fmt: skip
    with open(os.path.join(args.out, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    print(f"saved scorer to {args.out} ({time.time() - t0:.0f}s)", flush=True)


if __name__ == "__main__":
    main()
