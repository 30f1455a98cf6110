"""The runs of the token-pruning and frequency-domain reproduction, as ``nmsparse train`` flags.

Sizes were chosen to fit about 30 CPU-minutes on one thread (measured on a shared 2-core
machine: the ViT trains at ~230 images/s, the frequency ResNets at ~750 images/s):

* tokens: ``vit_tiny`` (keep ratio 1.0) and ``spvit_tiny`` (0.7, 0.5 per stage, selectors
  before blocks 1 and 3) with dim 32, depth 4, 2 heads, MLP ratio 2, patch 4 (7x7 = 49
  tokens on 28x28 Fashion-MNIST), AdamW 2e-3, 2 epochs of 250 batches of 32 (16,000
  images seen, a random subset per epoch; small batches because a ViT this size learns
  per step, not per image), dense and 2:4 SR-STE (every eligible layer).
* frequency: ``dct_resnet`` (block 4: 16 frequency channels on a 7x7 grid; all, or the top
  half / quarter picked by a gate trained first for 2 epochs with that target) and
  ``downsampled_resnet`` (the image area-averaged 4x to 7x7: the same input grid), resnet20
  at width 0.5 with the two stride-2 reductions removed in both, SGD 0.1, 4 epochs of 40
  batches of 128 (20,480 images seen).

Every run is tested on the first 40 batches (5,120 images) of the test set, seeds 0, 1, 2.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

DATA = ["--data", "fashion-mnist", "--data-dir", "/usr/share/datasets/fashion-mnist",
        "--threads", "1", "--no-plots"]
TEST_128 = ["--batch-size", "128", "--limit-test-batches", "40"]  # 5,120 test images
SEEDS = (0, 1, 2)
KEEP_RATIOS = (1.0, 0.7, 0.5)
PRUNE_AT = [1, 3]
VIT = {"dim": 32, "depth": 4, "heads": 2, "mlp_ratio": 2, "patch_size": 4}
VIT_TRAIN = ["--optimizer", "adamw", "--lr", "2e-3", "--weight-decay", "0.05",
             "--warmup-epochs", "0.1", "--epochs", "2", "--limit-train-batches", "250",
             "--batch-size", "32", "--limit-test-batches", "160"]
CNN_TRAIN = [*TEST_128, "--optimizer", "sgd", "--lr", "0.1", "--warmup-epochs", "0.5",
             "--epochs", "4", "--limit-train-batches", "40", "--pattern", "dense"]
GATE_TRAIN = [*TEST_128, "--optimizer", "sgd", "--lr", "0.1", "--warmup-epochs", "0.5",
              "--epochs", "2", "--limit-train-batches", "40", "--pattern", "dense"]
BLOCK, WIDTH = 4, 0.5
FREQUENCY_CHANNELS = BLOCK * BLOCK
KEPT = {"all": None, "half": FREQUENCY_CHANNELS // 2, "quarter": FREQUENCY_CHANNELS // 4}
GATE_WEIGHT = 5.0  # with logits starting at 0 (keep probability 1/2)


@dataclass
class Run:
    """One ``nmsparse train`` run; ``needs`` names a gate run whose top-k channels it uses."""

    name: str
    group: str
    labels: dict
    model: str
    options: dict
    train: list[str]
    seed: int
    needs: str | None = None
    keep: int | None = None
    extra: list[str] = field(default_factory=list)

    def args(self, out: str, channels: list[int] | None = None) -> list[str]:
        options = dict(self.options)
        if channels is not None:
            options["channels"] = channels
        flags = [arg for key, value in options.items()
                 for arg in ("--model-option", f"{key}={json.dumps(value)}")]
        return ["train", "--model", self.model, *flags, *DATA, *self.train, *self.extra,
                "--seed", str(self.seed), "--out", out]


def token_runs() -> list[Run]:
    runs = []
    for seed in SEEDS:
        for weights, flags in (("dense", ["--pattern", "dense"]),
                               ("2:4", ["--pattern", "2:4", "--method", "srste"])):
            for ratio in KEEP_RATIOS:
                model, options = "vit_tiny", dict(VIT)
                if ratio < 1:
                    model = "spvit_tiny"
                    options.update(prune_at=PRUNE_AT, keep_ratio=ratio, ratio_weight=2.0)
                tag = weights.replace(":", "of")
                runs.append(Run(f"tokens-keep{ratio}-{tag}-s{seed}", "tokens",
                                {"keep_ratio": ratio, "weights": weights}, model, options,
                                VIT_TRAIN, seed, extra=flags))
    return runs


def frequency_runs() -> list[Run]:
    runs = []
    for seed in SEEDS:
        runs.append(Run(f"freq-spatial-s{seed}", "frequency", {"input": "spatial 4x down"},
                        "downsampled_resnet", {"factor": BLOCK, "width": WIDTH}, CNN_TRAIN,
                        seed))
        for kept, count in KEPT.items():
            options = {"block": BLOCK, "width": WIDTH}
            gate = None
            if count is not None:
                gate = f"freq-gate-{kept}-s{seed}"
                runs.append(Run(gate, "gate", {"target": count / FREQUENCY_CHANNELS},
                                "dct_resnet", {**options, "gate_target":
                                               count / FREQUENCY_CHANNELS,
                                               "gate_weight": GATE_WEIGHT},
                                GATE_TRAIN, seed, keep=count))
            runs.append(Run(f"freq-dct-{kept}-s{seed}", "frequency", {"input": f"DCT {kept}"},
                            "dct_resnet", options, CNN_TRAIN, seed, needs=gate, keep=count))
    return runs


def all_runs() -> list[Run]:
    return [*frequency_runs(), *token_runs()]
