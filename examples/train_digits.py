"""Train a 2:4 sparse MLP from scratch with SR-STE on scikit-learn's 8x8 digits.

The library side of what `nmsparse train` does with its defaults, written out as an ordinary
PyTorch loop: one `sparsify` call, then the analysis the library offers (SAD, params/MACs,
check, finalize). Use it as a template for your own loop; `nmsparse train` adds run folders,
checkpoints, resuming and plots. Runs in a few seconds on 2 CPU cores with no download.
"""

from __future__ import annotations

import argparse
import time

import torch
from sklearn.datasets import load_digits
from torch import nn

import nmsparse
from nmsparse.sad import SADTracker


def load(seed: int):
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    test, train = order[:360], order[360:]  # a fixed 20 % test split
    return (x[train], y[train]), (x[test], y[test])


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        correct = (model(x).argmax(1) == y).float().mean().item()
    model.train()
    return correct


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pattern", default="2:4")
    parser.add_argument("--method", default="srste", choices=sorted(nmsparse.METHODS))
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    (x_train, y_train), (x_test, y_test) = load(args.seed)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                          nn.Linear(256, 10))
    handle = nmsparse.sparsify(model, args.pattern, method=args.method)
    print(handle, end="\n\n")

    steps_per_epoch = len(x_train) // 64
    total_steps = args.epochs * steps_per_epoch
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-5)
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=total_steps,
                                                   pct_start=0.1, anneal_strategy="cos")
    tracker = SADTracker(handle.masks)
    start = time.perf_counter()
    for epoch in range(args.epochs):
        order = torch.randperm(len(x_train))
        for step in range(steps_per_epoch):
            batch = order[step * 64:(step + 1) * 64]
            loss = nn.functional.cross_entropy(model(x_train[batch]), y_train[batch])
            opt.zero_grad()
            loss.backward()
            opt.step()  # SR-STE term and mask refresh happen here, no extra call
            schedule.step()
        row = tracker.record(step=(epoch + 1) * steps_per_epoch, epoch=epoch)
        if epoch % 5 == 4 or epoch == args.epochs - 1:
            print(f"epoch {epoch + 1:3d}  loss {loss.item():.4f}  "
                  f"test acc {accuracy(model, x_test, y_test):.4f}  "
                  f"SAD vs previous epoch {row['sad_prev_total']:5d}  "
                  f"vs initial {row['sad_init_frac']:.3f}")
    print(f"\ntrained in {time.perf_counter() - start:.1f} s")
    print(nmsparse.summary(model, x_test[:1]), end="\n\n")
    nmsparse.finalize(model)
    print(nmsparse.check(model, args.pattern))
    print(f"\nfinal test accuracy (finalized model): {accuracy(model, x_test, y_test):.4f}")


if __name__ == "__main__":
    main()
