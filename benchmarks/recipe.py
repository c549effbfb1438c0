"""What a benchmark measures: a training config of the project, cut to one workload.

Both frameworks are timed on the training recipe of a real config (``configs/*.py``), so that the JAX numbers
describe the step that ``main.py`` runs and the torch reference does the same work:

    configs/imagenet.py:variant=13     CvT-13 at 224: AdamW, label smoothing 0.1, mixup/cutmix, no clipping
    configs/cifar100.py:variant=...    the 32x32 recipe: the same plus gradient clipping 1.0

`load_config` reads such a string (as ``--config`` of main.py does); `Workload` fixes what the benchmark
overrides (model, input size, batch sizes, dtype, activation, ``--set key=value`` config fields) and knows
`auto_recipe`, the config a variant is benchmarked with by default. No JAX or torch import here.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import pathlib
import sys
from typing import Any

REPO = pathlib.Path(__file__).resolve().parents[1]
DTYPES = ("float32", "bfloat16", "float16")
OFFICIAL = {"cvt_13": "13", "cvt_21": "21", "cvt_w24": "w24"}


def auto_recipe(model: str) -> str:
    """The config a variant is benchmarked with: the ImageNet recipe for official variants, else CIFAR-100's."""
    if model in OFFICIAL:
        return f"configs/imagenet.py:variant={OFFICIAL[model]}"
    return f"configs/cifar100.py:variant={model}"


def load_config(recipe: str) -> Any:
    """Loads ``path/to/config.py[:args]`` (relative to the repository or absolute) as main.py's ``--config``.

    Raises:
      ValueError: when the file does not exist (naming the config files there are).
    """
    path_text, _, arg = recipe.partition(":")
    path = pathlib.Path(path_text)
    if not path.is_absolute():
        path = REPO / path
    if not path.is_file():
        known = ", ".join(sorted(f"configs/{p.name}" for p in (REPO / "configs").glob("*.py") if p.stem[0] != "_"))
        raise ValueError(f"Recipe config {path_text!r} does not exist; use one of {known} (with :args).")
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    spec = importlib.util.spec_from_file_location(f"_bench_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module.get_config(arg or None)


def parse_sets(items: list[str] | None) -> dict[str, Any]:
    """``['optimizer=sgd', 'aug.mixup_alpha=0']`` -> ``{'optimizer': 'sgd', 'aug.mixup_alpha': 0}`` (typed)."""
    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise ValueError(f"--set {item!r} is not key=value (e.g. --set grad_clip_norm=0).")
        key, text = (s.strip() for s in item.split("=", 1))
        value: Any = text
        for cast in (int, float):
            try:
                value = cast(text)
                break
            except ValueError:
                continue
        if text.lower() in ("true", "false"):
            value = text.lower() == "true"
        out[key] = value
    return out


@dataclasses.dataclass(frozen=True)
class Workload:
    """One benchmarked workload: a recipe config plus what the benchmark sets.

    Attributes:
      model: Registered variant.
      image_size: Input side.
      train_batch: Training batch (one device).
      infer_batch: Inference batch.
      dtype: Compute dtype (parameters stay float32).
      act: MLP activation (``gelu`` matches the HuggingFace port; ``quick_gelu`` is official).
      recipe: The config string (``configs/FILE.py[:args]``); empty: `auto_recipe`.
      sets: Further config overrides, ``{'dotted.key': value}``.
      num_classes: Classifier outputs (0: the recipe dataset's).
      steps: Timed steps.
      warmup: Untimed steps (the first included).
      seed: Seed of parameters and synthetic data.
    """

    model: str
    image_size: int
    train_batch: int = 128
    infer_batch: int = 256
    dtype: str = "bfloat16"
    act: str = "gelu"
    recipe: str = ""
    sets: tuple[tuple[str, Any], ...] = ()
    num_classes: int = 0
    steps: int = 10
    warmup: int = 2
    seed: int = 0

    def __post_init__(self):
        if not self.recipe:
            object.__setattr__(self, "recipe", auto_recipe(self.model))
        if not self.num_classes:
            object.__setattr__(self, "num_classes", dataset_classes(load_config(self.recipe)))

    def config(self, batch: int | None = None) -> Any:
        """The recipe's config with this workload's model, size, batch, dtype, activation and sets applied."""
        config = load_config(self.recipe)
        config.model = self.model
        config.image_size = self.image_size
        config.batch_size = int(batch or self.train_batch)
        config.eval_batch_size = int(self.infer_batch)
        config.dtype = self.dtype
        config.act = self.act
        config.seed = self.seed
        # The benchmark's images are RGB; the schedule's length only sets values, not the work.
        config.num_channels = 3
        config.num_train_steps = 10_000
        for key, value in self.sets:
            node = config
            *parents, leaf = key.split(".")
            for p in parents:
                node = node[p]
            if leaf not in node:
                raise ValueError(f"--set {key}: the config has no field {key!r} (see configs/default.py).")
            node[leaf] = type(node[leaf])(value) if node[leaf] is not None else value
        return config


def dataset_classes(config: Any) -> int:
    """Class count of the recipe's dataset (without reading it), 1000 when unknown."""
    from cvt_flax.data.info import KNOWN_DATASETS

    entry = KNOWN_DATASETS.get(str(config.dataset))
    return int(entry.num_classes) if entry else 1000


def train_recipe(config: Any, num_classes: int) -> dict[str, Any]:
    """The training work of a config in framework-neutral terms (what the torch reference must also do)."""
    from cvt_flax import train_utils as tu

    run = tu.derive_run_length(config, max(int(config.batch_size), 1) * 10)
    return {
        "optimizer": str(config.optimizer).lower(),
        "learning_rate": tu.peak_learning_rate(config),
        "warmup_steps": run.warmup_steps,
        "total_steps": run.total_steps,
        "warmup_init_lr": float(config.warmup_init_lr),
        "min_learning_rate": float(config.min_learning_rate),
        "weight_decay": float(config.weight_decay),
        "b1": float(config.b1),
        "b2": float(config.b2),
        "eps": float(config.eps),
        "momentum": float(config.momentum),
        "nesterov": bool(config.nesterov),
        "grad_clip_norm": float(config.grad_clip_norm),
        "log_grad_norm": tu.log_grad_norm(config),
        "label_smoothing": float(config.label_smoothing),
        "mixup_alpha": float(config.aug.mixup_alpha),
        "cutmix_alpha": float(config.aug.cutmix_alpha),
        "mix_prob": float(config.aug.mix_prob),
        "cutmix_switch_prob": float(config.aug.cutmix_switch_prob),
        "drop_path_rate": float(config.drop_path_rate),
        "ema_decay": float(config.ema_decay),
        "num_classes": int(num_classes),
    }


def add_workload_args(p: argparse.ArgumentParser) -> None:
    """Arguments shared with torch_reference.py and compare.py."""
    p.add_argument("--recipe", default="", help="training config whose step is timed (default: by variant)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    p.add_argument("--dtype", default="bfloat16", choices=DTYPES, help="compute dtype (params stay float32)")
    p.add_argument("--act", default="gelu", help="MLP activation: gelu (as the HF reference) or quick_gelu")
    p.add_argument("--steps", type=int, default=10, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps, the first (compiling) one included")
    p.add_argument("--num-classes", type=int, default=0, help="classifier outputs (0: the recipe dataset's)")
    p.add_argument("--peak-tflops", type=float, default=None, help="override the device's peak TFLOP/s for MFU")
    p.add_argument("--find-max-batch", action="store_true", help="double the train batch until out of memory")
    p.add_argument("--max-batch-limit", type=int, default=None, help="largest batch --find-max-batch tries")
    p.add_argument("--json", default=None, help="write the record(s) to this JSON file")
    p.add_argument("--seed", type=int, default=0)


def workload_from_args(args: argparse.Namespace, model: str, image_size: int, train: int, infer: int) -> Workload:
    """The `Workload` of parsed `add_workload_args` arguments."""
    return Workload(
        model=model,
        image_size=image_size,
        train_batch=train,
        infer_batch=infer,
        dtype=args.dtype,
        act=args.act,
        recipe=args.recipe,
        sets=tuple(parse_sets(args.set).items()),
        num_classes=args.num_classes,
        steps=args.steps,
        warmup=args.warmup,
        seed=args.seed,
    )
