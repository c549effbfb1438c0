"""How much a model's frozen features know about a few-shot image-folder task (a transfer diagnostic).

For each stage of a CvT (its token map, flattened) and its pooled features (``pre_logits``), the accuracy of
a nearest-class-mean classifier (cosine similarity to the mean feature of each class's few training images)
on the test split, for the given model and for the same architecture freshly initialised, beside raw pixels.
Features that do worse than a random network's say that pre-training specialised them away from the task.

    python -m benchmarks.feature_probe --model runs/fmnist/model --data-dir ../shared/data/digits \\
        --per-class 10 --seed 0

The few-shot draw is `cvt_flax.data.info.few_shot_subset`'s (the same images as
``--config.train_examples_per_class=N --config.train_subset_seed=S``); images are resized to the model's
input size and normalised with the training images' own mean and standard deviation.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def _load(files: list[tuple[str, int]], size: int, channels: int) -> tuple[np.ndarray, np.ndarray]:
    """Images resized to ``size`` in [0, 1] (`cvt_flax.serving.preprocess` without normalisation) and labels."""
    from cvt_flax import serving

    plain = {"image_size": size, "channels": channels, "crop": "none", "interpolation": "bilinear", "mean": 0.0,
             "std": 1.0}  # fmt: skip
    images = [serving.preprocess(path, plain) for path, _ in files]
    return np.stack(images), np.asarray([label for _, label in files])


def nearest_class_mean(train: np.ndarray, train_labels: np.ndarray, test: np.ndarray, test_labels: np.ndarray) -> float:
    """Test accuracy of cosine nearest-class-mean on ``[N, D]`` features."""

    def unit(x: np.ndarray) -> np.ndarray:
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)

    train, test = unit(train.reshape(len(train), -1)), unit(test.reshape(len(test), -1))
    classes = np.unique(train_labels)
    centroids = np.stack([train[train_labels == c].mean(0) for c in classes])
    return float((classes[np.argmax(test @ centroids.T, axis=1)] == test_labels).mean())


def _features(model: Any, variables: Any, *image_sets: np.ndarray, batch: int = 256) -> list[dict[str, np.ndarray]]:
    """Flattened features of each image set (one jitted function for all of them)."""
    apply = jax.jit(lambda v, x: model.apply(v, x, return_features=True)[1])
    results = []
    for images in image_sets:
        out: dict[str, list[np.ndarray]] = {}
        for i in range(0, len(images), batch):
            feats = apply(variables, jnp.asarray(images[i : i + batch]))
            for name, value in feats.items():
                if value is not None:
                    out.setdefault(name, []).append(np.asarray(value).reshape(len(value), -1))
        results.append({name: np.concatenate(parts) for name, parts in out.items()})
    return results


def probe(model_dir: str, data_dir: str, per_class: int, seed: int, split: str = "train", eval_split: str = "test"):
    """Rows ``{features, pretrained, random}`` of nearest-class-mean test accuracies (and ``pixels``)."""
    import cvt_flax
    from configs import default
    from cvt_flax import models
    from cvt_flax.data import info as info_lib

    model, variables, meta = cvt_flax.from_pretrained(model_dir)
    spec = model.spec
    size = int(meta.get("preprocessing", {}).get("image_size") or meta.get("image_size") or 224)
    config = default.get_config()
    config.dataset, config.data_dir, config.train_split, config.eval_split = "image_folder", data_dir, split, eval_split
    config.train_examples_per_class, config.train_subset_seed = per_class, seed
    source = info_lib.open_source(config)
    x_train, y_train = _load(source.files[split], size, spec.in_chans)
    x_test, y_test = _load(source.files[eval_split], size, spec.in_chans)
    mean, std = float(x_train.mean()), float(x_train.std()) or 1.0
    x_train, x_test = (x_train - mean) / std, (x_test - mean) / std

    fresh = models.create_model(spec, model.num_classes, init_method=getattr(model, "init_method", "trunc_norm"))
    fresh_vars = fresh.init(jax.random.key(seed), jnp.zeros((1, size, size, spec.in_chans)))
    trained = _features(model, variables, x_train, x_test)
    random = _features(fresh, fresh_vars, x_train, x_test)
    rows = [{"features": "pixels", "pretrained": nearest_class_mean(x_train, y_train, x_test, y_test), "random": None}]
    order = [n for n in trained[0] if n.startswith("stage")] + [n for n in trained[0] if not n.startswith("stage")]
    for name in order:
        rows.append(
            {
                "features": name,
                "pretrained": nearest_class_mean(trained[0][name], y_train, trained[1][name], y_test),
                "random": nearest_class_mean(random[0][name], y_train, random[1][name], y_test),
            }
        )
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="model directory, training workdir or hub id")
    parser.add_argument("--data-dir", required=True, help="image folder root (<root>/<split>/<class>/*.png)")
    parser.add_argument("--per-class", type=int, default=10, help="training images per class")
    parser.add_argument("--seed", type=int, default=0, help="draw of the few-shot subset (and the random init)")
    parser.add_argument("--json", default="", help="also write the rows here")
    args = parser.parse_args(argv)
    rows = probe(args.model, args.data_dir, args.per_class, args.seed)
    print(f"nearest-class-mean test accuracy, {args.per_class} images per class (seed {args.seed})")
    print("| features | this model | same architecture, random init |")
    print("| --- | ---: | ---: |")
    for r in rows:
        rnd = "-" if r["random"] is None else f"{100 * r['random']:.1f}%"
        print(f"| {r['features']} | {100 * r['pretrained']:.1f}% | {rnd} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
