"""Classify images with a pretrained or trained CvT: top-k class names and probabilities per image.

    python -m cvt_flax.predict --model microsoft/cvt-13 cat.jpg photos/ --top-k 5
    python -m cvt_flax.predict --model runs/digits/model data/digits/test --json > predictions.json
    python -m cvt_flax.predict --model gs://bucket/runs/in1k/model gs://bucket/photos/   # Cloud Storage too

    from cvt_flax.predict import predict
    predict("microsoft/cvt-13", ["cat.jpg"], top_k=5)
    # [{'image': 'cat.jpg', 'predictions': [{'index': 281, 'label': 'tabby, tabby cat', 'probability': 0.83}, ...]}]

``--model`` takes whatever `cvt_flax.from_pretrained` takes (hub ids, model directories, workdirs, checkpoint
files) and directories written by ``python -m cvt_flax.export``. Images are preprocessed with PIL and numpy as
the model's metadata says (`cvt_flax.metadata`: resize, crop, mean/std; grayscale models get luminance, RGB
models RGB), batched, and classified by one jitted function on whatever device JAX has.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

from cvt_flax import errors, paths, serving


class Predictor:
    """A CvT with its variables, class names and preprocessing; `predict` classifies images.

    Attributes:
      model: The Flax module.
      variables: ``{'params', 'batch_stats'}`` (on the default device).
      info: The ``model.json`` metadata.
      class_names: One name per class.
      preprocessing: How images become inputs (`cvt_flax.metadata`).
    """

    def __init__(self, model: Any, variables: Any, info: dict[str, Any]):
        import jax

        from cvt_flax import metadata

        self.model = model
        self.info = info
        self.class_names, self.preprocessing = metadata.describe(info)
        if not self.class_names:
            raise ValueError(
                "This model has no classifier head (num_classes=0): it returns features, not classes. Use a "
                "checkpoint with a head, or fine-tune one (configs/finetune.py)."
            )
        self.variables = jax.device_put(variables)

        def probabilities(variables: Any, images: Any) -> Any:
            logits = model.apply(variables, images, train=False)
            return jax.nn.softmax(logits.astype(np.float32), axis=-1)

        self._probabilities = jax.jit(probabilities)

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        """Class probabilities ``[B, num_classes]`` of a preprocessed float32 batch ``[B, H, W, C]``."""
        return np.asarray(self._probabilities(self.variables, np.asarray(images, np.float32)))

    def predict(self, images: Sequence[Any], top_k: int = 5, batch_size: int = 64) -> list[dict[str, Any]]:
        """Top-k classes of each image (paths, PIL images or uint8 arrays); see `serving.predict_images`."""
        return serving.predict_images(
            self.probabilities, images, self.preprocessing, self.class_names, top_k_classes=top_k,
            batch_size=batch_size,
        )  # fmt: skip


def load_predictor(model: Any, **overrides: Any) -> Predictor | serving.ExportedModel:
    """What `predict` runs: a `Predictor` or an `cvt_flax.serving.ExportedModel`.

    Args:
      model: A name or path for `cvt_flax.from_pretrained`, an exported model directory (run without flax), a
        ``(model, variables, info)`` triple, or a `Predictor` / `ExportedModel` (returned as is).
      **overrides: For `cvt_flax.checkpoint.model_from_info` when ``model`` is a name.

    Returns:
      The predictor.
    """
    if isinstance(model, Predictor | serving.ExportedModel):
        return model
    if isinstance(model, tuple) and len(model) == 3:
        return Predictor(*model)
    if isinstance(model, str | os.PathLike):
        path = paths.as_path(model)
        if (path / serving.EXPORT_FILE).is_file():
            return serving.load_exported(path)
        from cvt_flax.pretrained import from_pretrained

        return Predictor(*from_pretrained(model, **overrides))
    raise TypeError(
        f"predict() takes a model name or path, a (model, variables, info) triple or a Predictor, got "
        f"{type(model).__name__}."
    )


def predict(
    model_or_name: Any,
    images_or_paths: Any,
    top_k: int = 5,
    *,
    batch_size: int = 64,
    trust_pickle: bool = False,
) -> list[dict[str, Any]]:
    """Classifies images: top-k class names and probabilities per image.

    Args:
      model_or_name: A hub id, model directory, workdir, checkpoint file or exported directory; a
        ``(model, variables, info)`` triple from `cvt_flax.from_pretrained`; or a `Predictor`.
      images_or_paths: An image file or folder (searched recursively), or a list of files, folders, PIL images
        and uint8 arrays.
      top_k: Classes per image.
      batch_size: Images per jitted call (the last batch is padded, so it compiles once).
      trust_pickle: Allow ``torch.load(weights_only=False)`` for a local ``.pth`` file you trust.

    Returns:
      One ``{'image': path (or list index), 'predictions': [{'index', 'label', 'probability'}, ...]}`` per image,
      most probable first.
    """
    predictor = load_predictor(model_or_name, **({"trust_pickle": True} if trust_pickle else {}))
    if isinstance(images_or_paths, str | os.PathLike):
        images_or_paths = [images_or_paths]
    items: list[Any] = []
    for item in images_or_paths:
        items.extend(serving.list_images([item]) if isinstance(item, str | os.PathLike) else [item])
    return predictor.predict(items, top_k=top_k, batch_size=batch_size)


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m cvt_flax.predict`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="python -m cvt_flax.predict",
        description="Classify images with a CvT: top-k class names and probabilities per image.",
    )
    parser.add_argument(
        "--model",
        required=True,
        help="Hub id (microsoft/cvt-13), cvt-flax model directory or workdir, .pth/HuggingFace checkpoint, or an "
        "exported directory (python -m cvt_flax.export); paths may be gs:// URLs.",
    )
    parser.add_argument(
        "images", nargs="+", help="Image files and/or folders (searched recursively), local or gs:// URLs."
    )
    parser.add_argument("--top-k", type=int, default=5, help="Classes per image (default 5).")
    parser.add_argument("--batch-size", type=int, default=64, help="Images per batch (default 64).")
    parser.add_argument("--json", action="store_true", help="Print one JSON document (a list, one entry per image).")
    parser.add_argument(
        "--trust-pickle", action="store_true", help="Allow torch.load(weights_only=False) for a .pth file you trust."
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    args = build_parser().parse_args(argv)
    if args.top_k < 1 or args.batch_size < 1:
        return errors.report(errors.UserError("--top-k and --batch-size must be positive."))
    try:
        files = serving.list_images(args.images)
        results = predict(
            args.model, files, top_k=args.top_k, batch_size=args.batch_size, trust_pickle=args.trust_pickle
        )
    except Exception as e:  # noqa: BLE001 - a user error becomes one message; an internal one re-raises
        return errors.report(e)
    if args.json:
        json.dump(results, sys.stdout, indent=1)
        sys.stdout.write("\n")
        return 0
    for r in results:
        print(r["image"])
        for rank, p in enumerate(r["predictions"], start=1):
            print(f"  {rank}. {p['label']} ({p['index']}): {p['probability']:.4f}")
    return 0


def console_main() -> None:
    """Console entry point (installed as a ``cvt-*`` command): exits with `main`'s status."""
    raise SystemExit(main())


if __name__ == "__main__":
    sys.exit(main())
