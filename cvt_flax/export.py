"""Export a CvT for serving without the training code: `jax.export` (+ optional TF SavedModel through jax2tf).

    python -m cvt_flax.export --model microsoft/cvt-13 --output /tmp/cvt13_serving [--saved-model]
    python -m cvt_flax.export --model gs://bucket/runs/in1k/model --output gs://bucket/serving/in1k

writes::

    DIR/model.jaxexport    # serialized jax.export.Exported: (weights, images [B, H, W, C]) -> (logits, probs),
                           # B symbolic (any batch size), float32
    DIR/weights.npz        # the weights it takes, w00000, w00001, ... (kept out of the program: any model size)
    DIR/metadata.json      # class names, preprocessing, input shape, platforms, source model
    DIR/cvt_serving.py     # the loader (a copy of cvt_flax/serving.py): needs jax + numpy (+ PIL for files)
    DIR/saved_model/       # with --saved-model: TF SavedModel, signature serving_default(images) -> logits, probs

and `load_exported` runs it with jax and numpy only (no flax, no cvt_flax model code)::

    from cvt_flax.export import load_exported    # or, with DIR alone: sys.path.insert(0, DIR); import cvt_serving
    model = load_exported(DIR)
    logits, probs = model(batch)                 # preprocessed float32 [B, H, W, C]
    model.predict(["cat.jpg"], top_k=5)

This module imports flax and the model code only inside `export_model`.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np
from etils import epath

from cvt_flax import errors, paths, serving
from cvt_flax.serving import ExportedModel, load_exported

__all__ = ["ExportedModel", "export_model", "load_exported", "main"]
SAVED_MODEL_DIR = "saved_model"


def _default_platforms() -> tuple[str, ...]:
    """This machine's platform plus CPU and CUDA, so that an export made anywhere also serves on those two."""
    return tuple(dict.fromkeys((serving._platform(), "cpu", "cuda")))


def export_model(
    model: Any,
    output: str | os.PathLike,
    *,
    platforms: Sequence[str] | None = None,
    saved_model: bool = False,
    overwrite: bool = False,
    **overrides: Any,
) -> epath.Path:
    """Exports the inference function of a model to ``output`` (see the module docstring).

    Args:
      model: Anything `cvt_flax.from_pretrained` takes, or its ``(model, variables, info)`` result.
      output: The directory to write (created), local or ``gs://``.
      platforms: ``jax.export`` platforms (``'cpu'``, ``'cuda'``, ``'rocm'``, ``'tpu'``); default: this machine's,
        CPU and CUDA.
      saved_model: Also write a TF SavedModel (needs TensorFlow).
      overwrite: Replace an existing export in ``output``.
      **overrides: For `cvt_flax.checkpoint.model_from_info` when ``model`` is a name (e.g. ``dtype``).

    Returns:
      The output directory.

    Raises:
      FileExistsError: when ``output`` is not empty and ``overwrite`` is False.
      ImportError: for ``saved_model=True`` without TensorFlow.
    """
    import jax
    import jax.numpy as jnp
    from jax import export as jax_export

    from cvt_flax import metadata
    from cvt_flax.pretrained import from_pretrained

    output = paths.as_path(output)
    if output.exists() and (not output.is_dir() or any(output.iterdir())) and not overwrite:
        raise FileExistsError(f"{output} exists and is not empty; pass --overwrite (overwrite=True) to replace it.")
    if saved_model:
        try:
            import tensorflow  # noqa: F401
        except ImportError as e:
            raise ImportError(
                "--saved-model needs TensorFlow (`pip install tensorflow-cpu`); the jax.export files need only jax."
            ) from e
    module, variables, info = model if isinstance(model, tuple) else from_pretrained(model, **overrides)
    class_names, preprocessing = metadata.describe(info)
    size, channels = int(preprocessing["image_size"]), int(preprocessing["channels"])
    leaves, treedef = jax.tree.flatten({c: variables.get(c, {}) for c in ("params", "batch_stats")})
    leaves = [np.asarray(x) for x in leaves]

    def infer(weights: list[Any], images: Any) -> tuple[Any, Any]:
        logits = module.apply(jax.tree.unflatten(treedef, weights), images, train=False).astype(jnp.float32)
        return logits, jax.nn.softmax(logits, axis=-1)

    (batch,) = jax_export.symbolic_shape("batch")
    weight_specs = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in leaves]
    image_spec = jax.ShapeDtypeStruct((batch, size, size, channels), jnp.float32)
    platforms = tuple("cuda" if p == "gpu" else p for p in platforms) if platforms else _default_platforms()
    exported = jax_export.export(jax.jit(infer), platforms=platforms)(weight_specs, image_spec)

    if output.exists() and overwrite:
        output.rmtree()
    paths.makedirs(output)
    (output / serving.EXPORT_FILE).write_bytes(exported.serialize())
    weights = io.BytesIO()  # numpy writes local files only: build the archive, then write it wherever output is
    np.savez(weights, **{f"w{i:05d}": x for i, x in enumerate(leaves)})
    (output / serving.WEIGHTS_FILE).write_bytes(weights.getvalue())
    (output / serving.SERVING_FILE).write_bytes(paths.read_bytes(serving.__file__))
    meta = {
        "format": "cvt-flax-export",
        "format_version": 1,
        "inputs": "images: float32 [batch, H, W, C], preprocessed as 'preprocessing' says",
        "outputs": ["logits", "probabilities"],
        "input_shape": [size, size, channels],
        "num_classes": len(class_names),
        "class_names": class_names,
        "preprocessing": preprocessing,
        "platforms": list(exported.platforms),
        "jax_version": jax.__version__,
        "model": {k: info.get(k) for k in ("variant", "spec", "act", "source", "hub_id", "hub_commit") if k in info},
    }
    if saved_model:
        _save_tf(infer, leaves, (size, size, channels), output / SAVED_MODEL_DIR)
        meta["saved_model"] = SAVED_MODEL_DIR
    (output / serving.METADATA_FILE).write_text(json.dumps(meta, indent=1) + "\n")
    return output


def _save_tf(infer: Any, leaves: list[np.ndarray], shape: tuple[int, int, int], directory: epath.Path) -> None:
    """A TF SavedModel of ``infer`` (jax2tf), weights as variables, any batch size."""
    import tensorflow as tf
    from jax.experimental import jax2tf

    h, w, c = shape
    tf_infer = jax2tf.convert(infer, polymorphic_shapes=[None, f"(b, {h}, {w}, {c})"], with_gradient=False)
    module = tf.Module()
    module.weights = [tf.Variable(x, trainable=False) for x in leaves]

    @tf.function(input_signature=[tf.TensorSpec([None, h, w, c], tf.float32, name="images")], autograph=False)
    def serve(images: Any) -> dict[str, Any]:
        logits, probs = tf_infer(module.weights, images)
        return {"logits": logits, "probabilities": probs}

    module.serve = serve
    tf.saved_model.save(module, os.fspath(directory), signatures={"serving_default": serve})  # gs:// too
    _check_saved_model(directory, infer, leaves, shape)


def _check_saved_model(directory: epath.Path, infer: Any, leaves: list[np.ndarray], shape: tuple[int, ...]) -> None:
    """Loads the SavedModel back with this TensorFlow and compares one image's logits with jax's.

    A SavedModel holds a serialized StableHLO program that the loading TensorFlow must be able to deserialize
    (TensorFlow 2.21 reads StableHLO up to its own version, not newer ops); an artefact that this TensorFlow cannot
    load is removed and refused, so that no export that cannot be served is left behind.
    """
    import tensorflow as tf

    x = np.random.default_rng(0).standard_normal((1, *shape)).astype(np.float32)
    try:
        served = tf.saved_model.load(os.fspath(directory)).signatures["serving_default"](images=tf.constant(x))
        got = served["logits"].numpy()
    except Exception as e:  # noqa: BLE001 - any failure to load or run means: cannot be served here
        directory.rmtree()
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise errors.UserError(
            f"TensorFlow {tf.__version__} cannot load the SavedModel this export would write ({first}); it was "
            "not kept. The jax.export files are written; serve those (cvt_serving.py), or export with the "
            "TensorFlow version that will serve it."
        ) from e
    want = np.asarray(infer(leaves, x)[0])
    if not np.allclose(got, want, rtol=1e-4, atol=1e-4):
        directory.rmtree()
        raise errors.UserError(
            f"The SavedModel's logits differ from jax's by {float(np.max(np.abs(got - want))):.3g} under "
            f"TensorFlow {tf.__version__}; it was not kept. The jax.export files are written; serve those."
        )


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m cvt_flax.export`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="python -m cvt_flax.export",
        description="Export a CvT's inference function (jax.export, optional TF SavedModel) for serving without "
        "the training code.",
    )
    parser.add_argument(
        "--model", required=True, help="Hub id (microsoft/cvt-13), model directory, workdir or checkpoint file."
    )
    parser.add_argument("--output", required=True, help="Directory to write, local or gs://bucket/...")
    parser.add_argument(
        "--platforms",
        default=None,
        help="Comma-separated jax.export platforms, e.g. cpu,cuda,tpu (default: this machine's, cpu and cuda).",
    )
    parser.add_argument("--saved-model", action="store_true", help="Also write a TF SavedModel (needs TensorFlow).")
    parser.add_argument("--overwrite", action="store_true", help="Replace an existing export in --output.")
    parser.add_argument(
        "--trust-pickle", action="store_true", help="Allow torch.load(weights_only=False) for a .pth file you trust."
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    args = build_parser().parse_args(argv)
    platforms = [p.strip() for p in args.platforms.split(",") if p.strip()] if args.platforms else None
    try:
        out = export_model(
            args.model,
            args.output,
            platforms=platforms,
            saved_model=args.saved_model,
            overwrite=args.overwrite,
            **({"trust_pickle": True} if args.trust_pickle else {}),
        )
    except Exception as e:  # noqa: BLE001 - a user error becomes one message; an internal one re-raises
        return errors.report(e)
    meta = json.loads((out / serving.METADATA_FILE).read_text())
    print(
        f"Exported {args.model} -> {out}\n  input float32 [batch, {', '.join(map(str, meta['input_shape']))}], "
        f"{meta['num_classes']} classes, platforms {', '.join(meta['platforms'])}"
        + (f", TF SavedModel in {out / SAVED_MODEL_DIR}" if args.saved_model else "")
    )
    return 0


def console_main() -> None:
    """Console entry point (installed as a ``cvt-*`` command): exits with `main`'s status."""
    raise SystemExit(main())


if __name__ == "__main__":
    sys.exit(main())
