"""taming-transformers' PatchGAN discriminator in plain PyTorch, with ``tf_actnorm.torch.ActNorm``.

``NLayerDiscriminator`` below follows VQGAN's (taming-transformers,
``taming/modules/discriminator/model.py``): with ``use_actnorm=True`` its norm layers
are ActNorm, imported with the one line ``from tf_actnorm.torch import ActNorm``
(taming's own is ``from taming.modules.util import ActNorm``). It trains for a few
hinge-loss steps against a tiny generator on built-in synthetic images (coloured
discs on a shaded background; nothing is downloaded), then prints:

* what the first training batch did to each ActNorm (its output standardised);
* D and G losses;
* how much one image's patch logits move with the rest of its batch and between
  ``train()`` and ``eval()``: exactly 0 with ActNorm, not with ``BatchNorm2d``.

    python examples/taming_discriminator.py [--quick] [--out DIR]
"""

import argparse
import os

import matplotlib
import torch
from torch import nn

from tf_actnorm.torch import ActNorm

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--quick", action="store_true", help="tiny run, for smoke tests")
parser.add_argument("--out", default=".", help="directory for taming_discriminator.png")
args = parser.parse_args()
os.makedirs(args.out, exist_ok=True)  # before training, so a bad --out fails fast
steps, batch, ndf = (3, 8, 16) if args.quick else (100, 32, 32)
torch.manual_seed(0)


def weights_init(m):
    """taming's initialisation: N(0, 0.02) convolutions, N(1, 0.02) BatchNorm weights."""
    if isinstance(m, nn.Conv2d):
        nn.init.normal_(m.weight, 0.0, 0.02)
    elif isinstance(m, nn.BatchNorm2d):
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)


class NLayerDiscriminator(nn.Module):
    """PatchGAN discriminator (pix2pix), as in VQGAN: one logit per overlapping patch."""

    def __init__(self, input_nc=3, ndf=64, n_layers=3, use_actnorm=False):
        super().__init__()
        norm_layer = ActNorm if use_actnorm else nn.BatchNorm2d
        use_bias = norm_layer is not nn.BatchNorm2d  # BatchNorm has its own shift
        layers = [nn.Conv2d(input_nc, ndf, 4, stride=2, padding=1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2 ** n, 8)
            layers += [
                nn.Conv2d(ndf * prev, ndf * mult, 4, stride=2 if n < n_layers else 1, padding=1,
                          bias=use_bias),
                norm_layer(ndf * mult),
                nn.LeakyReLU(0.2, True),
            ]
        layers.append(nn.Conv2d(ndf * mult, 1, 4, stride=1, padding=1))
        self.main = nn.Sequential(*layers)

    def forward(self, input):
        return self.main(input)


def real_images(n, generator):
    """[n, 3, 32, 32] in [-1, 1]: a shaded background and one coloured disc each."""
    g = lambda *shape: torch.rand(*shape, generator=generator)  # noqa: E731
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, 32), torch.linspace(-1, 1, 32), indexing="ij")
    background = (g(n, 3, 1, 1) - 0.5) + 0.3 * (g(n, 1, 1, 1) - 0.5) * (ys + xs)
    centre, radius = 1.2 * (g(n, 2, 1, 1) - 0.5), 0.2 + 0.3 * g(n, 1, 1, 1)
    inside = ((ys - centre[:, :1]) ** 2 + (xs - centre[:, 1:]) ** 2) < radius[:, :1] ** 2
    return torch.where(inside, 2 * g(n, 3, 1, 1) - 1, background).clamp(-1, 1)


def make_generator():
    return nn.Sequential(
        nn.Linear(16, 64 * 8 * 8), nn.ReLU(), nn.Unflatten(1, (64, 8, 8)),
        nn.Upsample(scale_factor=2), nn.Conv2d(64, 32, 3, padding=1), nn.ReLU(),
        nn.Upsample(scale_factor=2), nn.Conv2d(32, 3, 3, padding=1), nn.Tanh())


def train_gan(disc, gen, data_gen):
    """Hinge-loss steps as in VQGAN; optimizers built first (D's first forward initialises)."""
    d_opt = torch.optim.Adam(disc.parameters(), lr=2e-4, betas=(0.5, 0.9))
    g_opt = torch.optim.Adam(gen.parameters(), lr=5e-4, betas=(0.5, 0.9))
    history = []
    for step in range(steps):
        real, noise = real_images(batch, data_gen), torch.randn(batch, 16, generator=data_gen)
        fake = gen(noise)
        d_loss = (torch.relu(1.0 - disc(real)).mean()
                  + torch.relu(1.0 + disc(fake.detach())).mean())
        d_opt.zero_grad()
        d_loss.backward()
        d_opt.step()
        g_loss = -disc(fake).mean()
        g_opt.zero_grad()
        g_loss.backward()
        g_opt.step()
        history.append((step, d_loss.item(), g_loss.item()))
    return history


def first_batch_stats(disc, x):
    """Per ActNorm: (channels, max |mean|, min std, max std) of its output on x."""
    outputs = []
    hooks = [m.register_forward_hook(lambda m, i, o: outputs.append((m.num_features, o.detach().clone())))
             for m in disc.modules() if isinstance(m, ActNorm)]  # clone: LeakyReLU is in place
    disc(x)  # train() mode: the first batch initialises every ActNorm, one after the other
    for h in hooks:
        h.remove()
    rows = []
    for channels, out in outputs:
        mean, std = out.mean((0, 2, 3)), out.std((0, 2, 3), unbiased=False)
        rows.append((channels, mean.abs().max().item(), std.min().item(), std.max().item()))
    return rows


@torch.no_grad()
def batch_dependence(disc, x, others_a, others_b):
    """How much D's patch logits for x[0] move with the rest of its batch, and with the mode."""
    disc.train()
    train_a = disc(torch.cat([x[:1], others_a]))[0]
    train_b = disc(torch.cat([x[:1], others_b]))[0]
    disc.eval()
    infer = disc(torch.cat([x[:1], others_a]))[0]
    disc.train()
    return (train_a - train_b).abs().max().item(), (train_a - infer).abs().max().item()


data_gen = torch.Generator().manual_seed(1)
results, models = {}, {}
for name in ("ActNorm", "BatchNorm2d"):
    torch.manual_seed(0)
    disc = NLayerDiscriminator(ndf=ndf, use_actnorm=name == "ActNorm")
    disc.apply(weights_init)
    gen = make_generator()
    if name == "ActNorm":
        print("ActNorm output on the first training batch (it initialises them):")
        print(f"{'layer':>5} {'channels':>8} {'max |mean|':>11} {'std range':>17}")
        for i, (channels, mean, low, high) in enumerate(
                first_batch_stats(disc, real_images(batch, data_gen))):
            print(f"{i:>5} {channels:>8} {mean:>11.1e} {low:>8.4f} to {high:.4f}")
    history = train_gan(disc, gen, data_gen)
    shown = sorted({*range(0, steps, max(1, steps // 4)), steps - 1})
    for step, d_loss, g_loss in (history[i] for i in shown):
        print(f"{name}: step {step:>3}: D loss {d_loss:.3f}, G loss {g_loss:.3f}")
    x = real_images(2 * batch, data_gen)
    results[name] = batch_dependence(disc, x, x[1:batch], x[batch:2 * batch - 1])
    models[name] = disc, gen

print(f"one image's max |patch logit difference| after {steps} adversarial steps:")
print(f"{'norm':<12} {'between two batches':>20} {'train() vs eval()':>18}")
for name, (between, modes) in results.items():
    print(f"{name:<12} {between:>20.1e} {modes:>18.1e}")

# --- Picture: real and generated images, D's patch logits, the differences above. ---
disc, gen = models["ActNorm"]
disc.eval()
with torch.no_grad():
    real = real_images(4, torch.Generator().manual_seed(5))
    fake = gen(torch.randn(4, 16, generator=torch.Generator().manual_seed(6)))
    logits = disc(torch.cat([real, fake]))[:, 0]


def tile(images):  # [N, C, H, W] in [-1, 1] -> one row, RGB in [0, 1]
    return torch.cat(list(images.permute(0, 2, 3, 1)), dim=1).add(1).div(2).clamp(0, 1).numpy()


fig, axes = plt.subplots(1, 3, figsize=(14, 3.6), width_ratios=[2, 1.2, 1.2])
axes[0].imshow(torch.cat([torch.as_tensor(tile(real)), torch.as_tensor(tile(fake))]).numpy())
axes[0].set_title(f"top: real; bottom: generator after {steps} steps")
limit = logits.abs().max().item()
axes[1].imshow(torch.cat([torch.cat(list(logits[:4]), 1), torch.cat(list(logits[4:]), 1)]),
               cmap="RdBu", vmin=-limit, vmax=limit)
axes[1].set_title("ActNorm D's patch logits\n(blue: real)")
for ax in axes[:2]:
    ax.set(xticks=[], yticks=[])
names = list(results)
for offset, k, label in [(-0.2, 0, "between two batches"), (0.2, 1, "train() vs eval()")]:
    values = [results[n][k] for n in names]
    bars = axes[2].bar([i + offset for i in range(len(names))], [max(v, 1e-7) for v in values],
                       width=0.4, label=label)
    axes[2].bar_label(bars, [f"{v:.0e}" if v else "0" for v in values], fontsize=8)
axes[2].set(yscale="log", ylim=(1e-7, 1e2), xticks=range(len(names)), xticklabels=names,
            title="max |Δ logit| of one image")
axes[2].legend(fontsize=8, loc="upper left")
fig.tight_layout()
path = os.path.join(args.out, "taming_discriminator.png")
fig.savefig(path, dpi=80)
print(f"wrote {path}")
