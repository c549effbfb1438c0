"""End-to-end training on 8 fake CPU devices: mocked CIFAR-100, the shared Fashion-MNIST, resume, fine-tuning, errors.

Every run uses ``cvt_tiny`` for 4 steps. The runs share two compiled programs (mocked CIFAR-100 at 32x32 with 100
classes; Fashion-MNIST tiled to RGB at 28x28 with 10 classes), and a persistent JAX compilation cache makes
repeated runs of a program cheap. Steps, image size, channels and class count are part of the programs: keep them
so that runs share them. The tests that train are marked slow (the first compilation takes 20-40 s on 2 cores);
the bad-input ones fail before compiling.
"""

import json
import os
import shutil
import signal

import jax
import numpy as np
import pytest

tfds = pytest.importorskip("tensorflow_datasets")
pytest.importorskip("tensorflow")

from configs import smoke  # noqa: E402
from cvt_flax import checkpoint as ckpt_lib  # noqa: E402
from cvt_flax import train as train_lib  # noqa: E402

# Compile each program once per machine (tests, resumed runs and subprocesses reuse it).

MOCK_TRAIN, MOCK_TEST = 64, 40


def write_mock_metadata(data_dir, name: str) -> None:
    """Split metadata for `tfds.testing.mock_data` (the data code reads split sizes from it)."""
    builder = tfds.builder(name, data_dir=str(data_dir))
    os.makedirs(builder.data_dir, exist_ok=True)
    template = tfds.core.ShardedFileTemplate(
        data_dir=builder.data_dir, template="{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}", dataset_name=name
    )
    splits = [
        tfds.core.SplitInfo(name=split, shard_lengths=[n], num_bytes=0, filename_template=template)
        for split, n in (("train", MOCK_TRAIN), ("test", MOCK_TEST))
    ]
    builder.info.set_splits(tfds.core.SplitDict(splits))
    builder.info.write_to_directory(builder.data_dir)


@pytest.fixture(scope="module")
def mock_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tfds_mock")
    write_mock_metadata(path, "cifar100")
    return path


def cifar_config(mock_dir, **overrides):
    config = smoke.get_config()
    config.data_dir = str(mock_dir)
    config.train_split = "train"
    for k, v in overrides.items():
        config[k] = v
    return config


def fmnist_config(shared_dir, **overrides):
    """Real Fashion-MNIST (train[:256]), tiled to 3 channels so that CIFAR-trained weights fit."""
    config = smoke.get_config("dataset=fashion_mnist")
    config.data_dir = str(shared_dir / "tfds")
    config.num_channels = 3
    for k, v in overrides.items():
        config[k] = v
    return config


def run(config, workdir):
    """Trains on mocked TFDS data.

    The mock redirects file-system calls to a temporary tree while TFDS builds a dataset (e.g. each eval pass);
    an asynchronous checkpoint write at that moment would land there, so saves wait until written.
    """
    save = ckpt_lib.Checkpoints.save

    def save_and_wait(self, *args, **kwargs):
        save(self, *args, **kwargs)
        self.wait()

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ckpt_lib.Checkpoints, "save", save_and_wait)
        with tfds.testing.mock_data(num_examples=MOCK_TRAIN, data_dir=str(config.data_dir)):
            return train_lib.train_and_evaluate(config, str(workdir))


def run_real(config, workdir):
    return train_lib.train_and_evaluate(config, str(workdir))


def final_params(workdir):
    variables, _ = ckpt_lib.load_init_from(str(workdir))
    return variables["params"]


def flat(tree):
    leaves = jax.tree_util.tree_leaves_with_path(tree)
    return {"/".join(str(getattr(k, "key", k)) for k in p): np.asarray(v) for p, v in leaves}


def patch_data(monkeypatch, at_step: int, action: str) -> None:
    """Makes the train iterator misbehave at one step (SIGTERM to this process, or NaN images)."""
    from cvt_flax import data

    real = data.create_train_iterator

    def create_train_iterator(config, mesh, *, seed, start_step):
        for step, batch in enumerate(real(config, mesh, seed=seed, start_step=start_step), start=start_step + 1):
            if step == at_step and action == "sigterm":
                os.kill(os.getpid(), signal.SIGTERM)
            if step == at_step and action == "nan":
                batch = {**batch, "image": batch["image"] * np.float32("nan")}
            yield batch

    monkeypatch.setattr(data, "create_train_iterator", create_train_iterator)


# ----------------------------------------------------------------------------- mocked CIFAR-100


@pytest.fixture(scope="module")
def cifar_run(mock_dir, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("cifar_run")
    summary = run(cifar_config(mock_dir), workdir)
    return workdir, summary


@pytest.mark.slow
def test_end_to_end_on_mocked_cifar100(cifar_run):
    workdir, summary = cifar_run
    assert summary["status"] == "completed" and summary["step"] == 4 and summary["num_devices"] == 8
    assert summary["final_eval"]["count"] == MOCK_TEST  # 40 examples in 2 eval batches of 32, the last padded
    assert summary["best_eval"]["step"] == 4 and summary["train_images_per_sec"] > 0
    assert json.loads((workdir / "summary.json").read_text())["final_eval"] == summary["final_eval"]
    assert json.loads((workdir / "config.json").read_text())["model"] == "cvt_tiny"
    assert (workdir / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(workdir))
    assert sorted(os.listdir(workdir / "checkpoints")) == ["2", "4"]
    assert (workdir / "model" / "model.json").is_file()
    history = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["split"]) for r in history] == [(2, "train"), (4, "train"), (4, "eval")]
    assert all(np.isfinite(r["loss"]) for r in history)
    assert {"learning_rate", "grad_norm", "images_per_sec", "accuracy"} <= set(history[0])


@pytest.mark.slow
def test_eval_only_restores_the_latest_checkpoint(cifar_run, mock_dir):
    workdir, summary = cifar_run
    result = run(cifar_config(mock_dir, eval_only=True), workdir)
    assert result["step"] == 4 and result["count"] == MOCK_TEST
    assert result["accuracy"] == pytest.approx(summary["final_eval"]["accuracy"])
    assert result["loss"] == pytest.approx(summary["final_eval"]["loss"], rel=1e-5)
    assert json.loads((workdir / "eval.json").read_text())["accuracy"] == result["accuracy"]
    assert sorted(os.listdir(workdir / "checkpoints")) == ["2", "4"]  # nothing trained or saved


@pytest.mark.slow
def test_eval_only_from_init_from_creates_nothing_but_eval_json(cifar_run, mock_dir, tmp_path, capsys):
    source, summary = cifar_run
    workdir = tmp_path / "eval"
    result = run(cifar_config(mock_dir, eval_only=True, init_from=str(source)), workdir)
    assert result["step"] == 4 and result["source"].endswith("checkpoints/4")  # the weights' step, not 0
    assert result["accuracy"] == pytest.approx(summary["final_eval"]["accuracy"])
    assert os.listdir(workdir) == ["eval.json"]  # no checkpoints/, config.json or parameter table


@pytest.mark.slow
def test_finetune_from_checkpoint_with_new_class_count(cifar_run, shared_dir, tmp_path):
    """CIFAR-100 weights (100 classes) -> Fashion-MNIST (10): new head, every other weight copied."""
    source, _ = cifar_run
    summary = run_real(fmnist_config(shared_dir, init_from=str(source)), tmp_path)
    assert summary["status"] == "completed" and summary["resumed_from_step"] == 0
    before, after = flat(final_params(source)), flat(final_params(tmp_path))
    assert after["head/kernel"].shape == (48, 10) and before["head/kernel"].shape == (48, 100)
    for k, v in after.items():
        if not k.startswith("head/"):
            # Four AdamW steps at lr <= 1e-3 move each weight by about 4e-3 at most (a fresh init: ~0.1).
            assert np.abs(v - before[k]).max() < 1e-2, k


@pytest.mark.slow
def test_init_from_with_another_architecture_names_the_paths(cifar_run, mock_dir, tmp_path):
    source, _ = cifar_run
    with pytest.raises(ValueError) as e:
        run(cifar_config(mock_dir, model="cvt_mini", init_from=str(source)), tmp_path)
    msg = str(e.value)
    assert "does not match model 'cvt_mini'" in msg and "shape mismatches" in msg
    assert "params/norm/scale: checkpoint (48,) vs model (128,)" in msg and "... and " in msg
    assert "the checkpoint says 'cvt_tiny'" in msg


@pytest.mark.slow
def test_resuming_with_another_model_is_refused(cifar_run, mock_dir, tmp_path):
    source, _ = cifar_run
    workdir = tmp_path / "w"
    shutil.copytree(source / "checkpoints", workdir / "checkpoints")
    with pytest.raises(
        ValueError, match=r"was written for variant 'cvt_tiny', but this config has 'cvt_mini'.*--workdir"
    ):
        run(cifar_config(mock_dir, model="cvt_mini"), workdir)
    with pytest.raises(ValueError, match=r"(?s)another structure \(ema_params.*EMA setting.*new --workdir"):
        run(cifar_config(mock_dir, ema_decay=0.99), workdir)  # same model, but the state has no EMA


@pytest.mark.slow
def test_finetune_from_converted_huggingface_checkpoint(mock_dir, tmp_path, caplog):
    """A random HF CvtForImageClassification (5 labels) -> save_pretrained -> convert -> init_from (100 classes)."""
    convert = pytest.importorskip("cvt_flax.convert")
    from cvt_flax import checkpoint

    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hf_config = transformers.CvtConfig(
        num_channels=3,
        patch_sizes=[3, 3, 3],
        patch_stride=[2, 2, 2],
        patch_padding=[1, 1, 1],
        embed_dim=[16, 32, 48],
        num_heads=[1, 2, 3],
        depth=[1, 1, 2],
        mlp_ratio=[2.0, 2.0, 2.0],
        drop_path_rate=[0.0, 0.0, 0.1],
        num_labels=5,
    )
    # transformers' CvtStage indexes its per-block drop-path list by the stage index, which fails when a stage
    # has no more blocks than its index (cvt_tiny's 1-1-2); the rates do not affect the weights, so pad the list.
    from transformers.models.cvt import modeling_cvt

    linspace = modeling_cvt.torch.linspace
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(modeling_cvt.torch, "linspace", lambda a, b, n, **kw: linspace(a, b, max(n, 3), **kw))
        hf_model = transformers.CvtForImageClassification(hf_config)
    hf_model.save_pretrained(tmp_path / "hf")
    variables, info = convert.convert_checkpoint(tmp_path / "hf")
    checkpoint.save_model(tmp_path / "converted", variables, info)
    assert info["act"] == "gelu" and info["num_classes"] == 5

    workdir = tmp_path / "run"
    config = cifar_config(mock_dir, init_from=str(tmp_path / "converted"))
    with caplog.at_level("WARNING"):
        summary = run(config, workdir)
    assert summary["status"] == "completed"
    assert "--config.act=gelu" in caplog.text  # the activation differs from the checkpoint's: said, not silent
    before, after = flat(variables["params"]), flat(final_params(workdir))
    assert after["head/kernel"].shape == (48, 100)
    assert np.abs(after["stage2/blocks_1/mlp/fc2/kernel"] - before["stage2/blocks_1/mlp/fc2/kernel"]).max() < 1e-2


# ----------------------------------------------------------------------------- Fashion-MNIST: resume, divergence


@pytest.fixture(scope="module")
def fmnist_straight(shared_dir, tmp_path_factory):
    """An uninterrupted 4-step run on the real Fashion-MNIST: (summary, workdir)."""
    workdir = tmp_path_factory.mktemp("fmnist_straight")
    summary = run_real(fmnist_config(shared_dir), workdir)
    assert summary["status"] == "completed" and summary["step"] == 4
    return summary, workdir


def _damage(step_dir):
    """Deletes the largest array file of a checkpoint (as a crash or a full disk during a copy would)."""
    files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and p.name not in ("_METADATA", "_sharding")]
    max(files, key=lambda p: p.stat().st_size).unlink()


@pytest.mark.slow
def test_damaged_newest_checkpoint_falls_back_to_the_intact_one(shared_dir, fmnist_straight, tmp_path, caplog):
    straight, straight_dir = fmnist_straight
    workdir = tmp_path / "run"
    run_real(fmnist_config(shared_dir), workdir)
    assert sorted(os.listdir(workdir / "checkpoints")) == ["2", "4"]
    _damage(workdir / "checkpoints" / "4")

    with caplog.at_level("WARNING"):
        again = run_real(fmnist_config(shared_dir), workdir)
    assert f"checkpoint {workdir / 'checkpoints' / '4'} is damaged" in caplog.text
    assert (workdir / "damaged_checkpoints" / "4" / "state").is_dir()  # moved aside, not deleted
    assert again["status"] == "completed" and again["resumed_from_step"] == 2 and again["step"] == 4
    a, b = flat(final_params(straight_dir)), flat(final_params(workdir))
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)

    # Every checkpoint damaged: one message listing them, nothing deleted.
    for step in ("2", "4"):
        _damage(workdir / "checkpoints" / step)
    with pytest.raises(ckpt_lib.DamagedCheckpointError, match="none of its 2 checkpoints can be restored") as e:
        run_real(fmnist_config(shared_dir), workdir)
    assert "checkpoints/4" in str(e.value) and "checkpoints/2" in str(e.value) and "Nothing was deleted" in str(e.value)
    assert sorted(os.listdir(workdir / "checkpoints")) == ["2", "4"]


def _truncate_array_file(step_dir):
    """Cuts the largest array file of a checkpoint in half (a copy or a disk that gave out mid-write)."""
    files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and p.name not in ("_METADATA", "_sharding")]
    big = max(files, key=lambda p: p.stat().st_size)
    big.write_bytes(big.read_bytes()[: big.stat().st_size // 2])


DAMAGES = {
    "truncated array file": _truncate_array_file,
    "deleted manifest": lambda step_dir: (step_dir / "state" / "manifest.ocdbt").unlink(),
    "deleted _METADATA": lambda step_dir: (step_dir / "state" / "_METADATA").unlink(),
}


@pytest.mark.slow
@pytest.mark.parametrize("damage", list(DAMAGES))
def test_each_damaged_checkpoint_kind_falls_back_quietly(shared_dir, fmnist_straight, tmp_path, capfd, caplog, damage):
    """Each kind of damage to the newest checkpoint is recognised as damage (a missing _METADATA used to read as a
    checkpoint of another structure): moved aside, resumed from the one before. (What the console shows is
    tested on a real process: test_cli.test_a_damaged_checkpoint_is_one_warning_and_a_move.)"""
    _, straight_dir = fmnist_straight
    workdir = tmp_path / "run"
    shutil.copytree(straight_dir, workdir)
    DAMAGES[damage](workdir / "checkpoints" / "4")
    capfd.readouterr()
    with caplog.at_level("WARNING"):
        again = run_real(fmnist_config(shared_dir), workdir)
    err = capfd.readouterr().err
    assert again["status"] == "completed" and again["resumed_from_step"] == 2 and again["step"] == 4
    assert (workdir / "damaged_checkpoints" / "4" / "state").is_dir()
    assert "Traceback" not in err, err[-3000:]
    assert "is damaged" in caplog.text and "Moved the damaged checkpoint" in caplog.text, caplog.text[-3000:]


@pytest.mark.slow
def test_killed_and_resumed_run_equals_uninterrupted(shared_dir, fmnist_straight, tmp_path, monkeypatch):
    straight, straight_dir = fmnist_straight

    patch_data(monkeypatch, at_step=3, action="sigterm")  # SIGTERM while step 3 runs: save at 3 and stop
    first = run_real(fmnist_config(shared_dir), tmp_path / "resumed")
    assert first["status"] == "preempted" and first["step"] == 3
    assert sorted(os.listdir(tmp_path / "resumed" / "checkpoints")) == ["2", "3"]
    monkeypatch.undo()
    second = run_real(fmnist_config(shared_dir), tmp_path / "resumed")
    assert second["status"] == "completed" and second["resumed_from_step"] == 3 and second["step"] == 4

    a, b = flat(final_params(straight_dir)), flat(final_params(tmp_path / "resumed"))
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert second["final_eval"] == pytest.approx(straight["final_eval"])
    steps = [(r["step"], r["split"]) for r in map(json.loads, (tmp_path / "resumed" / "metrics.jsonl").open())]
    assert steps == [(2, "train"), (4, "train"), (4, "eval")]


@pytest.mark.slow
def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(shared_dir, tmp_path, monkeypatch):
    patch_data(monkeypatch, at_step=3, action="nan")
    with pytest.raises(FloatingPointError) as e:
        run_real(fmnist_config(shared_dir), tmp_path)
    msg = str(e.value)
    assert "Non-finite training loss (nan) at step 4" in msg
    assert "last good checkpoint (step 2)" in msg and "--config.learning_rate" in msg
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2"]


# ----------------------------------------------------------------------------- bad inputs (fail before compiling)


@pytest.mark.parametrize(
    "overrides,error,match",
    [
        ({"model": "cvt_99"}, ValueError, r"Unknown CvT variant 'cvt_99'.*Registered variants: .*cvt_tiny"),
        ({"dataset": "svhn_nope"}, ValueError, r"svhn_nope"),
        (
            {"model": "cvt_13", "image_size": 2},
            ValueError,
            r"--config.image_size=2 is too small for model .cvt_13.*at least 3",
        ),
        ({"batch_size": 12}, ValueError, r"--config.batch_size=12 must be a positive multiple of the device count"),
        ({"optimizer": "lamb"}, ValueError, r"Unknown optimizer 'lamb'"),
        ({"dtype": "float8"}, ValueError, r"Unknown dtype 'float8'"),
        ({"depthwise_impl": "fft"}, ValueError, r"Unknown depthwise_impl 'fft'.*--config.depthwise_impl"),
        ({"freeze": "params/stage7/.*"}, ValueError, r"--config.freeze: 'params/stage7/.\*' matches no variable"),
        ({"layer_decay": 2.0}, ValueError, r"--config.layer_decay=2.0 must be in \[0, 1\]"),
        ({"require_init_from": True}, ValueError, r"--config.init_from is empty"),
        ({"eval_only": True}, ValueError, r"eval_only=True needs weights"),
        ({"init_from": "/nonexistent/ckpt"}, ValueError, r"init_from='/nonexistent/ckpt' does not exist"),
    ],
)
def test_bad_inputs_say_what_to_fix(shared_dir, tmp_path, overrides, error, match):
    with pytest.raises(error, match=match):
        run_real(fmnist_config(shared_dir, **overrides), tmp_path)


def test_init_from_without_a_checkpoint(shared_dir, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"holds no cvt-flax checkpoint or model.*python -m cvt_flax.convert"):
        run_real(fmnist_config(shared_dir, init_from=str(tmp_path / "empty")), tmp_path / "w")
