"""Which layer of the offline DINOv2 makes the best input for a linear head: a probe per layer.

For every transformer layer l of the offline DINOv2-S/14 (``dinov2-small-offline``), the model truncated to l
layers (its final layer norm applied, as the image_classification task computes it) embeds a seeded subset of
a dataset's training and held-out images; three features are probed — the class token, the mean patch token
and both concatenated (what Dinov2ForImageClassification's head sees) — with a logistic regression
(standardized features, scikit-learn) and a nearest-centroid classifier, scored by held-out accuracy.

Usage::

    python experiments/vit_probe.py --dataset digits --image-size 224 112 --train 500 --test 300
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

FEATURES = ("cls", "mean_patch", "cls+mean_patch")


def layer_features(model, pixels: torch.Tensor, batch_size: int = 32) -> np.ndarray:
    """[layers, n, 3, D]: per layer, the class token, mean patch token and (for concatenation) both, after the
    final layer norm; `pixels` float32 [n, 3, S, S] normalized."""
    out = []
    with torch.no_grad():
        for start in range(0, len(pixels), batch_size):
            states = model(pixels[start:start + batch_size], output_hidden_states=True).hidden_states[1:]
            normed = torch.stack([model.layernorm(h) for h in states])  # [L, b, T, D]
            out.append(torch.stack([normed[:, :, 0], normed[:, :, 1:].mean(dim=2)], dim=2).numpy())
    return np.concatenate(out, axis=1)


def probe(train: np.ndarray, y_train: np.ndarray, test: np.ndarray, y_test: np.ndarray) -> dict[str, float]:
    """Held-out accuracy of a logistic regression and of nearest centroid on features [n, D]."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(train)
    regression = LogisticRegression(max_iter=3000).fit(scaler.transform(train), y_train)
    centroids = np.stack([train[y_train == c].mean(axis=0) for c in np.unique(y_train)])
    nearest = np.unique(y_train)[((test[:, None] - centroids[None]) ** 2).sum(-1).argmin(axis=1)]
    return {"logistic": float((regression.predict(scaler.transform(test)) == y_test).mean()),
            "centroid": float((nearest == y_test).mean())}


def main() -> None:
    from transformers import Dinov2Model

    from decaf_ext.data.images import load_image_dataset
    from decaf_ext.tasks.dinov2_offline import IMAGE_PROCESSOR, dinov2_small_offline
    from decaf_ext.tasks.image_classification import resize_images

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--image-size", type=int, nargs="+", default=[224])
    parser.add_argument("--train", type=int, default=500)
    parser.add_argument("--test", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    train, test = load_image_dataset(args.dataset, seed=args.seed)
    rng = np.random.default_rng(args.seed)
    train_idx = np.sort(rng.permutation(len(train))[:args.train])
    test_idx = np.sort(rng.permutation(len(test))[:args.test])
    model = Dinov2Model.from_pretrained(dinov2_small_offline()).eval()
    mean = torch.tensor(IMAGE_PROCESSOR["image_mean"]).reshape(1, -1, 1, 1)
    std = torch.tensor(IMAGE_PROCESSOR["image_std"]).reshape(1, -1, 1, 1)
    results = []
    for size in args.image_size:
        started = time.perf_counter()
        features = [layer_features(model, (resize_images(data, idx, size).float() / 255 - mean) / std)
                    for data, idx in ((train, train_idx), (test, test_idx))]
        seconds = time.perf_counter() - started
        for layer in range(features[0].shape[0]):
            for k, name in enumerate(FEATURES):
                pick = (lambda f: f[layer][:, k]) if k < 2 else (lambda f: f[layer].reshape(f.shape[1], -1))
                scores = probe(pick(features[0]), train.labels[train_idx], pick(features[1]), test.labels[test_idx])
                results.append({"image_size": size, "layer": layer + 1, "feature": name, **scores})
        print(f"image size {size}: {len(train_idx) + len(test_idx)} images through 12 layers in {seconds:.0f} s")
    print(f"{args.dataset}, {len(train_idx)} train / {len(test_idx)} held-out images, seed {args.seed}")
    print("size layer  " + "  ".join(f"{name:>15} (logistic/centroid)" for name in FEATURES))
    for size in args.image_size:
        for layer in range(1, features[0].shape[0] + 1):
            rows = [r for r in results if r["image_size"] == size and r["layer"] == layer]
            print(f"{size:4d} {layer:5d}  " + "  ".join(
                f"{r['logistic']:>24.3f} / {r['centroid']:.3f}" for r in rows))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump({"dataset": args.dataset, "train": len(train_idx), "test": len(test_idx), "seed": args.seed,
                       "results": results}, handle, indent=1)


if __name__ == "__main__":
    main()
