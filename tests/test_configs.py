"""Config files: each loads with its options, sets only what differs from default.py, keeps derived values right."""

import ast
import importlib.util
import itertools
import os
import pathlib
import re

import pytest
from flax import traverse_util

from configs import config_args, default, offline_data
from cvt_flax import models
from cvt_flax import train_utils as tu

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = {
    "cifar100.py": [None, "recipe=seed", "variant=cvt_6_32"],
    "imagenet.py": [None, "variant=21", "variant=w24,res=384", "variant=13,res=384"],
    "finetune.py": [None, "dataset=oxford_iiit_pet,opt=adamw,res=384", "dataset=image_folder,data_dir=/tmp/x"],
    "fashion_mnist.py": [None, "variant=cvt_6_32,pipeline=device,epochs=1", "size=32"],
    "smoke.py": [None, "dataset=fashion_mnist,steps=6"],
}
# configs/ modules that are not recipes (no get_config(arg)).
NOT_RECIPES = {"default.py", "config_args.py", "offline_data.py"}
# Values tried, besides each option's own default, for the recipe options that have no fixed choices.
EXAMPLE_VALUES = {
    "cifar100.py": {"variant": models.list_models()},
    "fashion_mnist.py": {"epochs": [1.0], "batch": [256]},
    "finetune.py": {"variant": ["cvt_mini"], "res": [64], "data_dir": ["/data/x"], "epochs": [3.0]},
    "smoke.py": {"steps": [6]},
}


def load(name: str, arg: str | None = None):
    spec = importlib.util.spec_from_file_location(f"cfg_{name[:-3]}", REPO / "configs" / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg) if arg is not None else module.get_config()


def keys(config) -> set[str]:
    return set(traverse_util.flatten_dict(config.to_dict(), sep="."))


def test_every_config_file_is_covered():
    files = {p.name for p in (REPO / "configs").glob("*.py")} - NOT_RECIPES - {"__init__.py"}
    assert files == set(CONFIGS) == set(EXAMPLE_VALUES) | {"imagenet.py"}


@pytest.mark.parametrize("name,arg", [(n, a) for n, args in CONFIGS.items() for a in args])
def test_config_loads_and_layers_on_default(name, arg):
    config = load(name, arg)
    assert keys(config) == keys(default.get_config()), "task configs only set fields that default.py defines"
    spec = models.get_spec(config.model)
    spec.token_grid(config.image_size, config.image_size)  # the model takes the configured size
    assert config.optimizer in tu.OPTIMIZERS
    assert config.eval_batch_size == 2 * config.batch_size


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_docstring_has_a_runnable_command(name):
    text = (REPO / "configs" / name).read_text()
    assert re.search(rf"python main\.py --config=configs/{re.escape(name)}\S* --workdir=", text), name


def test_overrides_keep_derived_values():
    config = load("cifar100.py")
    config.batch_size = 256
    assert config.eval_batch_size == 512
    run = tu.derive_run_length(config, 50_000)
    assert run.steps_per_epoch == 195 and run.total_steps == 300 * 195 and run.warmup_steps == 5 * 195
    fm = load("fashion_mnist.py")
    fm.num_epochs = 2.0  # warmup is a fraction of the run and follows
    assert fm.warmup_epochs == pytest.approx(0.1)
    ft = load("finetune.py")
    ft.num_epochs = 30.0
    assert ft.warmup_epochs == pytest.approx(3.0)


def test_seed_recipe_is_the_student_setup():
    c = load("cifar100.py", "recipe=seed")
    assert (c.model, c.image_size, c.num_epochs, c.batch_size, c.optimizer) == ("cvt_13", 32, 350, 512, "adamw")
    assert (c.learning_rate, c.warmup_epochs, c.label_smoothing, c.weight_decay, c.dtype) == (
        0.02, 0.0, 0.0, 0.05, "float32")  # fmt: skip
    assert c.aug.mixup_alpha == c.aug.cutmix_alpha == c.aug.random_erasing == 0 and c.aug.randaugment_layers == 0
    ours = load("cifar100.py")
    assert (ours.model, ours.label_smoothing, ours.grad_clip_norm, ours.dtype) == ("cvt_13_32", 0.1, 1.0, "bfloat16")
    assert (ours.aug.mixup_alpha, ours.aug.cutmix_alpha, ours.aug.randaugment_layers) == (0.8, 1.0, 2)


@pytest.mark.parametrize(
    "variant,model,batch,wd,dpr",
    [("13", "cvt_13", 2048, 0.05, 0.1), ("21", "cvt_21", 1024, 0.1, 0.1), ("w24", "cvt_w24", 1024, 0.1, 0.3)],
)
def test_imagenet_official_recipe(variant, model, batch, wd, dpr):
    c = load("imagenet.py", f"variant={variant}")
    assert (c.model, c.batch_size, c.weight_decay, c.dataset) == (model, batch, wd, "imagenet2012")
    assert models.get_spec(c.model).drop_path_rate[-1] == dpr and c.drop_path_rate < 0
    # 2.5e-4 per 256 images (yaml LR x GPUs, SCALE_LR): 2e-3 at 2048, 1e-3 at 1024.
    assert tu.peak_learning_rate(c) == pytest.approx(2.5e-4 * batch / 256)
    assert (c.warmup_epochs, c.warmup_init_lr, c.min_learning_rate, c.num_epochs) == (5, 1e-6, 1e-5, 300)
    assert (c.aug.crop, c.aug.eval_crop, c.aug.eval_crop_ratio) == ("random_resized_crop", "center_crop", 0.875)
    assert c.aug.randaugment_magnitude == 9 and c.aug.random_erasing == 0.25 and c.label_smoothing == 0.1
    assert load("imagenet.py", f"variant={variant},res=384").aug.eval_crop == "resize"


def test_finetune_config():
    c = load("finetune.py", "dataset=cats_vs_dogs")
    assert c.require_init_from and c.init_from == ""
    assert (c.train_split, c.eval_split) == ("train[:90%]", "train[90%:]")
    assert c.optimizer == "sgd" and c.momentum == 0.9 and c.aug.mixup_alpha == 0 and c.aug.cutmix_alpha == 0
    assert c.learning_rate < default.get_config().learning_rate * 20  # a short, gentle schedule
    c = load("finetune.py", "dataset=image_folder,data_dir=/data/pets,res=160,opt=adamw")
    assert (c.data_dir, c.image_size, c.optimizer) == ("/data/pets", 160, "adamw")


def test_fashion_mnist_reads_shared_copy(shared_dir):
    c = load("fashion_mnist.py")
    assert os.path.isabs(c.data_dir) and pathlib.Path(c.data_dir) == shared_dir / "tfds"
    assert c.download is False and c.num_channels == 1 and c.image_size == 28 and c.model == "cvt_mini"
    d = load("fashion_mnist.py", "pipeline=device")
    assert pathlib.Path(d.data_dir) == shared_dir / "tfds_array_record" and d.input.pipeline == "device"


@pytest.mark.parametrize(
    "name,arg,match",
    [
        ("imagenet.py", "variant=42", r"variant='42' is not one of \['13', '21', 'w24'\]"),
        ("imagenet.py", "size=3", r"Unknown config argument 'size'; allowed: res, variant"),
        ("finetune.py", "dataset=svhn", r"dataset='svhn' is not one of"),
        ("fashion_mnist.py", "epochs=two", r"epochs='two' must be a number"),
        ("cifar100.py", "seed", r"'seed' is not key=value"),
    ],
)
def test_bad_config_arguments(name, arg, match):
    with pytest.raises(ValueError, match=match):
        load(name, arg)


def test_parse_types():
    out = config_args.parse("a=3,b=0.5,c=true,d=x", {"a": 1, "b": 1.0, "c": False, "d": ""})
    assert out == {"a": 3, "b": 0.5, "c": True, "d": "x"}


# ------------------------------------------------------------ recipes hold only their differences from default.py


def config_path(target: ast.expr) -> str | None:
    """``'aug.crop'`` for the target ``config.aug.crop``; None for anything else."""
    parts = []
    while isinstance(target, ast.Attribute):
        parts.append(target.attr)
        target = target.value
    return ".".join(reversed(parts)) if parts and isinstance(target, ast.Name) and target.id == "config" else None


def field_assignments(tree: ast.AST) -> list[ast.stmt]:
    """The statements that set a config field: ``config.<path> = ...`` (also ``+=`` and annotated)."""
    out = []
    for node in ast.walk(tree):
        targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
        if isinstance(node, ast.Assign | ast.AugAssign | ast.AnnAssign) and any(map(config_path, targets)):
            out.append(node)
    return sorted(out, key=lambda n: n.lineno)


def reference_sources() -> set[str]:
    """The fields that some config file derives others from (``config.get_ref("<field>")``)."""
    out = set()
    for path in (REPO / "configs").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get_ref":
                prefix = config_path(node.func.value)
                out.add(f"{prefix}.{node.args[0].value}" if prefix else node.args[0].value)
    return out


def option_args(name: str, monkeypatch) -> list[str]:
    """Every combination of a recipe's ``:key=value`` options (choices, or the default and EXAMPLE_VALUES)."""
    seen = {}
    parse = config_args.parse

    def spy(arg, defaults, choices=None):
        seen.update(defaults=dict(defaults), choices=dict(choices or {}))
        return parse(arg, defaults, choices)

    with monkeypatch.context() as m:
        m.setattr(config_args, "parse", spy)
        load(name)
    grid = {}
    for key, value in seen["defaults"].items():
        if key in seen["choices"]:
            grid[key] = list(seen["choices"][key])
        else:
            assert key in EXAMPLE_VALUES.get(name, {}), f"{name}: give option {key!r} values in EXAMPLE_VALUES"
            grid[key] = [value, *EXAMPLE_VALUES[name][key]]
    combinations = itertools.product(*grid.values())
    return [",".join(f"{k}={v}" for k, v in zip(grid, values, strict=True)) for values in combinations]


def resolved(config, sources: set[str]) -> list[dict]:
    """The config's fields (type and value) as built, then with every reference source set to 3, then 7.

    Moving the sources the same way in two configs compares derived fields by their definition: a field that
    follows ``num_epochs`` differs from a constant, even one equal to it as built.
    """
    out = []
    for value in (None, 3, 7):
        for source in sources if value is not None else ():
            *parents, leaf = source.split(".")
            node = config
            for parent in parents:
                node = node[parent]
            node[leaf] = type(node[leaf])(value)
        flat = traverse_util.flatten_dict(config.to_dict(), sep=".")
        out.append({k: (type(v), v) for k, v in flat.items()})
    return out


class DropStatement(ast.NodeTransformer):
    """Replaces the statement at ``statement``'s position by ``pass`` (in a fresh parse of the same source)."""

    def __init__(self, statement: ast.stmt):
        self.position = (statement.lineno, statement.col_offset)

    def visit(self, node: ast.AST) -> ast.AST:
        if isinstance(node, ast.stmt) and (node.lineno, node.col_offset) == self.position:
            return ast.copy_location(ast.Pass(), node)
        return super().visit(node)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_recipe_sets_only_what_differs_from_default(name, monkeypatch, tmp_path):
    """Each ``config.<field> = ...`` of a recipe changes its config in at least one option combination.

    A statement is redundant when the file without it builds the same resolved config for every option combination,
    with and without the offline data copies (``offline_data.SHARED_DIR`` present or absent): it sets the value the
    field already has (default.py's, in every combination where it runs) or one that a later statement replaces.
    """
    path = REPO / "configs" / name
    sources = reference_sources()
    assert "batch_size" in sources  # default.py's eval_batch_size follows it
    present = tmp_path / "present"
    for sub in offline_data.TFDS_DIRS.values():
        (present / sub).mkdir(parents=True)
    cases = [(shared, arg) for shared in (present, tmp_path / "absent") for arg in option_args(name, monkeypatch)]

    def build(tree: ast.Module):
        namespace = {"__name__": f"cfg_variant_{path.stem}", "__file__": str(path)}
        exec(compile(tree, str(path), "exec"), namespace)
        for shared, arg in cases:
            monkeypatch.setattr(offline_data, "SHARED_DIR", shared)
            yield resolved(namespace["get_config"](arg), sources)

    source = path.read_text()
    built = list(build(ast.parse(source)))
    statements = field_assignments(ast.parse(source))
    assert statements, f"{name} sets no field"
    redundant = []
    for statement in statements:
        tree = DropStatement(statement).visit(ast.parse(source))
        if all(a == b for a, b in zip(build(tree), built, strict=True)):
            redundant.append(f"configs/{name}:{statement.lineno}: {ast.unparse(statement)}")
    assert not redundant, "these lines change nothing (default.py's value in every option combination):\n" + (
        "\n".join(redundant)
    )


def test_default_documents_every_field():
    """Each field of default.py has a comment: on its line or above its block of consecutive assignments."""
    lines = (REPO / "configs" / "default.py").read_text().splitlines()
    statements = field_assignments(ast.parse("\n".join(lines)))
    assert len(statements) == len(traverse_util.flatten_dict(default.get_config().to_dict())) + 2  # + input, aug
    undocumented = []
    for statement in statements:
        row = statement.lineno - 1
        while row > 0 and lines[row - 1].strip().startswith("config."):  # the block's first line
            row -= 1
        if "#" not in lines[statement.lineno - 1] and not lines[row - 1].strip().startswith("#"):
            undocumented.append(ast.unparse(statement))
    assert not undocumented


def test_offline_data_dirs(monkeypatch, tmp_path):
    monkeypatch.setattr(offline_data, "SHARED_DIR", tmp_path)
    assert offline_data.tfds_data_dir("tfdata") is None and offline_data.tfds_data_dir("device") is None
    (tmp_path / "tfds").mkdir()
    assert offline_data.tfds_data_dir() == str(tmp_path / "tfds") and offline_data.tfds_data_dir("device") is None
    with pytest.raises(ValueError, match="Unknown input pipeline 'grain'"):
        offline_data.tfds_data_dir("grain")
    monkeypatch.setattr(offline_data, "SHARED_DIR", tmp_path / "absent")
    c = load("smoke.py", "dataset=fashion_mnist")
    assert c.data_dir is None and c.download is True  # TFDS's default data dir, downloading


def test_config_args_is_generic():
    """config_args parses ``key=value`` options and knows nothing of this repository's folders."""
    assert {n for n in vars(config_args) if not n.startswith("_")} <= {"annotations", "Any", "Mapping", "parse"}
