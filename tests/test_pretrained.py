"""Pretrained models without network: hub ids through a local HuggingFace cache, metadata, predict, export.

* Hub ids: a tiny random ``transformers.CvtForImageClassification`` is saved with ``save_pretrained`` and placed in
  a temporary HuggingFace cache in its on-disk layout (``models--org--name/refs/main`` + ``snapshots/<commit>/``);
  with ``HF_HUB_OFFLINE=1`` ``huggingface_hub.snapshot_download`` finds it there, and the real converter runs. The
  online path replaces only the two functions that talk to the Hub (`pretrained._hub_revision`,
  `pretrained._hub_download`).
* Predict: a ``cvt_tiny`` trained for a few steps on ``../shared/data/digits`` (image folder, 8x8 grayscale);
  predict's accuracy on the test folder must equal the run's own evaluation.
* Export: ``jax.export`` logits equal the model's; the loader runs in a subprocess without flax.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from cvt_flax import checkpoint, convert, metadata, pretrained, serving
from cvt_flax.predict import main as predict_main
from cvt_flax.predict import predict

REPO = pathlib.Path(__file__).resolve().parents[1]
COMMIT = "0123456789abcdef0123456789abcdef01234567"
REPO_ID = "microsoft/cvt-13"
LABELS = [f"label {i}" for i in range(5)]
PREPROCESSOR = {"crop_pct": 0.875, "do_normalize": True, "do_resize": True, "resample": 3, "size": 64,
                "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}  # fmt: skip


# ----------------------------------------------------------------------------- a tiny HuggingFace checkpoint


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
    """(HF directory with config.json + model.safetensors + preprocessor_config.json, images NHWC, torch logits)."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from test_parity import hf_model, images

    model = hf_model(
        5, embed_dim=[16, 32, 48], num_heads=[1, 2, 3], depth=[1, 2, 3], num_labels=5,
        id2label=dict(enumerate(LABELS)), label2id={n: i for i, n in enumerate(LABELS)},
    )  # fmt: skip
    directory = tmp_path_factory.mktemp("tiny_hf")
    model.save_pretrained(directory)
    (directory / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR))
    x = images(3, 2, 64, 64)
    with torch.no_grad():
        logits = model(x).logits.numpy()
    return directory, x.numpy().transpose(0, 2, 3, 1), logits


def add_to_hf_cache(hf_cache: pathlib.Path, repo_id: str, source: pathlib.Path, commit: str = COMMIT) -> None:
    """Places ``source``'s files in a HuggingFace cache as huggingface_hub lays out a download of ``repo_id``."""
    storage = hf_cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = storage / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for f in source.iterdir():
        shutil.copy(f, snapshot / f.name)
    (storage / "refs").mkdir(exist_ok=True)
    (storage / "refs" / "main").write_text(commit)


@pytest.fixture
def caches(tmp_path, monkeypatch):
    """Empty HuggingFace and cvt-flax caches, offline."""
    hf_cache, cvt_cache = tmp_path / "hf_cache", tmp_path / "cvt_cache"
    hf_cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(hf_cache))
    monkeypatch.setenv(pretrained.CACHE_ENV, str(cvt_cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return hf_cache, cvt_cache


def logits_of(pre: pretrained.Pretrained, x: np.ndarray) -> np.ndarray:
    model, variables, _ = pre
    return np.asarray(jax.jit(model.apply)(variables, x))


def forbid_conversion(monkeypatch) -> None:
    def fail(*args, **kwargs):
        raise AssertionError("converted again instead of using the cached copy")

    monkeypatch.setattr(convert, "convert_checkpoint", fail)


# ----------------------------------------------------------------------------- hub ids


def test_hub_id_offline_is_converted_once_then_loaded_from_the_cache(tiny_hf, caches, monkeypatch):
    hf_dir, x, ref = tiny_hf
    hf_cache, cvt_cache = caches
    add_to_hf_cache(hf_cache, REPO_ID, hf_dir)

    first = pretrained.from_pretrained(REPO_ID)
    target = cvt_cache / "microsoft" / f"cvt-13@{COMMIT}"
    assert (target / "model.json").is_file() and first.info["source"] == str(target)
    assert np.abs(logits_of(first, x) - ref).max() < 1e-4
    info = first.info
    assert info["hub_id"] == REPO_ID and info["hub_commit"] == COMMIT and info["hub_revision"] == "main"
    assert info["pretrained_on"] == "ImageNet-1k" and info["published_top1"] == 81.6
    assert info["class_names"] == LABELS and info["act"] == "gelu"
    # preprocessor_config.json (ConvNextImageProcessor): size 64 < 384 -> shorter side 73, centre crop 64, bicubic.
    assert info["preprocessing"] == metadata.make_preprocessing(
        64, crop="center", interpolation="bicubic", source=info["preprocessing"]["source"]
    )
    assert info["preprocessing"]["resize"] == 73 and info["image_size"] == 64

    # The second time: no conversion, the same weights from <cache>/microsoft/cvt-13@<commit>.
    forbid_conversion(monkeypatch)
    second = pretrained.from_pretrained(REPO_ID, dtype="float32")
    assert second.info["source"] == str(target)
    jax.tree.map(np.testing.assert_array_equal, first.variables, second.variables)
    # Without the HuggingFace cache the converted copy still serves (offline, revision main).
    shutil.rmtree(hf_cache / "models--microsoft--cvt-13")
    assert pretrained.from_pretrained(REPO_ID).info["source"] == str(target)


def test_offline_without_a_cached_copy_says_how_to_convert_a_local_file(caches, tmp_path, capsys):
    with pytest.raises(pretrained.PretrainedError) as e:
        pretrained.from_pretrained("microsoft/cvt-21-384")
    message = str(e.value)
    assert "offline" in message and "no network access" in message
    assert "python -m cvt_flax.convert --input FILE_OR_DIR --output DIR" in message
    # The CLIs print the message, not a traceback.
    image = tmp_path / "x.png"
    from PIL import Image

    Image.new("RGB", (9, 9)).save(image)
    assert predict_main(["--model", "microsoft/cvt-21-384", str(image)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: Cannot get 'microsoft/cvt-21-384'") and "Traceback" not in err
    assert convert.main(["--input", "microsoft/cvt-21-384", "--output", str(tmp_path / "out")]) == 2
    assert "no network access" in capsys.readouterr().err
    with pytest.raises(pretrained.PretrainedError, match="neither an existing file or directory nor"):
        pretrained.from_pretrained(str(tmp_path / "missing.pth"))


def test_online_downloads_only_what_conversion_needs(tiny_hf, caches, monkeypatch):
    """The online path with the two Hub calls replaced: safetensors preferred, converted once per commit."""
    hf_dir, x, ref = tiny_hf
    hf_cache, cvt_cache = caches
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(pretrained, "_offline", lambda: False)
    files = ["README.md", "config.json", "preprocessor_config.json", "pytorch_model.bin", "model.safetensors"]
    monkeypatch.setattr(pretrained, "_hub_revision", lambda repo_id, revision: (COMMIT, files))
    downloads = []

    def download(repo_id, commit, wanted):
        downloads.append(wanted)
        snapshot = hf_cache / "snapshot"
        snapshot.mkdir(exist_ok=True)
        for name in wanted:
            shutil.copy(hf_dir / name, snapshot / name)
        return snapshot

    monkeypatch.setattr(pretrained, "_hub_download", download)
    pre = pretrained.from_pretrained("microsoft/cvt-13-384-22k")
    assert downloads == [["config.json", "preprocessor_config.json", "model.safetensors"]]
    assert np.abs(logits_of(pre, x) - ref).max() < 1e-4
    assert pre.info["published_top1"] == 83.3 and pre.info["pretrained_on"] == "ImageNet-22k"
    forbid_conversion(monkeypatch)
    assert pretrained.from_pretrained("microsoft/cvt-13-384-22k").info["source"] == pre.info["source"]
    assert len(downloads) == 1

    # No network: the Hub call fails like a dead connection; the converted copy is used, else the error says so.
    def no_network(repo_id, revision):
        raise ConnectionError("[Errno -2] Name or service not known")

    monkeypatch.setattr(pretrained, "_hub_revision", no_network)
    assert pretrained.from_pretrained("microsoft/cvt-13-384-22k").info["source"] == pre.info["source"]
    with pytest.raises(pretrained.PretrainedError, match="no network access to the Hub"):
        pretrained.from_pretrained("microsoft/cvt-21")


def test_convert_cli_and_init_from_take_hub_ids(tiny_hf, caches, tmp_path):
    hf_dir, _, _ = tiny_hf
    hf_cache, cvt_cache = caches
    add_to_hf_cache(hf_cache, REPO_ID, hf_dir)
    out = tmp_path / "converted"
    assert convert.main(["--input", REPO_ID, "--output", str(out)]) == 0
    info = checkpoint.read_model_info(out)
    assert info["hub_id"] == REPO_ID and info["class_names"] == LABELS and info["preprocessing"]["image_size"] == 64
    variables, init_info = checkpoint.load_init_from(REPO_ID)  # --config.init_from=microsoft/cvt-13
    assert init_info["source"] == str(cvt_cache / "microsoft" / f"cvt-13@{COMMIT}")
    assert variables["params"]["head"]["kernel"].shape == (48, 5)
    with pytest.raises(ValueError, match="does not exist"):
        checkpoint.load_init_from("./no/such/dir")


def test_names(tmp_path):
    assert pretrained.looks_like_hub_id("microsoft/cvt-13") and pretrained.looks_like_hub_id("org/x@v1.0")
    assert not pretrained.looks_like_hub_id("CvT-13-224x224-IN-1k.pth")
    assert not pretrained.looks_like_hub_id("/abs/path") and not pretrained.looks_like_hub_id("a/b/c")
    assert not pretrained.looks_like_hub_id("runs/model.pth")
    assert pretrained.split_revision("org/x@v1") == ("org/x", "v1")
    assert set(pretrained.HUB_MODELS) == {
        "microsoft/cvt-13", "microsoft/cvt-13-384", "microsoft/cvt-13-384-22k", "microsoft/cvt-21",
        "microsoft/cvt-21-384", "microsoft/cvt-21-384-22k", "microsoft/cvt-w24-384-22k",
    }  # fmt: skip
    for repo_id, published in pretrained.HUB_MODELS.items():
        assert metadata.image_size_from_name(repo_id) in (None, published.resolution)
    assert metadata.image_size_from_name("CvT-13-384x384-IN-22k.pth") == 384


# ----------------------------------------------------------------------------- official checkpoints: metadata


def test_official_pth_gets_imagenet_names_and_the_official_eval_transform(tmp_path):
    torch = pytest.importorskip("torch")
    from test_convert import synthetic_state

    state = synthetic_state("cvt_tiny", 1000)
    path = tmp_path / "CvT-13-384x384-IN-22k.pth"
    torch.save({"state_dict": {k: torch.from_numpy(np.asarray(v)) for k, v in state.items()}}, path)
    model, variables, info = pretrained.from_pretrained(path)
    names = metadata.imagenet_class_names()
    assert info["class_names"] == list(names) and names[0] == "tench" and names[281] == "tabby"
    # 384 models: resize to 384x384, no crop; bicubic; ImageNet statistics (microsoft/CvT yaml + build.py).
    assert info["preprocessing"] == metadata.make_preprocessing(
        384, crop="none", interpolation="bicubic", source=info["preprocessing"]["source"]
    )
    # 224 models: shorter side int(224 / 0.875) = 256, centre crop 224.
    meta = metadata.converted_metadata(info, tmp_path / "CvT-13-224x224-IN-1k.pth")
    assert meta["preprocessing"]["crop"] == "center" and meta["preprocessing"]["resize"] == 256
    assert meta["image_size"] == 224
    assert model.num_classes == 1000 and variables["params"]["head"]["kernel"].shape == (48, 1000)


def test_preprocess_follows_the_metadata():
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)
    pp = metadata.make_preprocessing(16, crop="center", crop_pct=0.5, mean=(0.5,), std=(0.25,), channels=1)
    x = serving.preprocess(rgb, pp)
    assert x.shape == (16, 16, 1) and x.dtype == np.float32
    from PIL import Image

    # shorter side 32 = 16 / 0.5, the longer int(40 * 32 / 30) = 42 (truncated, as torchvision and HuggingFace)
    gray = Image.fromarray(rgb).convert("L").resize((42, 32), Image.BILINEAR)
    expected = (np.asarray(gray, np.float32)[8:24, 13:29, None] / 255 - 0.5) / 0.25
    np.testing.assert_array_equal(x, expected)
    x = serving.preprocess(rgb[..., :1], metadata.make_preprocessing(12))  # grayscale -> RGB model: tiled
    assert x.shape == (12, 12, 3) and np.allclose(x[..., 0] * 0.229 + 0.485, x[..., 1] * 0.224 + 0.456, atol=1e-6)


# ----------------------------------------------------------------------------- a model trained on the digits


@pytest.fixture(scope="module")
def digits_run(shared_dir, tmp_path_factory):
    """cvt_tiny trained 60 steps on ../shared/data/digits (8x8 grayscale, 10 folders): (workdir, summary)."""
    pytest.importorskip("tensorflow")
    from configs import smoke
    from cvt_flax import train

    config = smoke.get_config()
    config.dataset = "image_folder"
    config.data_dir = str(shared_dir / "data" / "digits")
    config.train_split, config.eval_split = "train", "test"
    config.image_size = 8
    config.num_channels = 0  # the folder's own channels: grayscale
    config.aug.crop_padding = 1
    config.aug.hflip = False
    config.aug.random_erasing = 0.0
    config.aug.mixup_alpha = config.aug.cutmix_alpha = 0.0
    config.label_smoothing = 0.0
    config.batch_size = 64
    config.learning_rate = 3e-3
    config.num_train_steps = 60
    config.log_every_steps = config.eval_every_steps = config.checkpoint_every_steps = 60
    workdir = tmp_path_factory.mktemp("digits_run")
    summary = train.train_and_evaluate(config, str(workdir))
    assert summary["status"] == "completed"
    return workdir, summary


def num_correct(results: list[dict]) -> int:
    """Top-1 hits of predictions on ROOT/<label>/<image> files."""
    return sum(pathlib.Path(r["image"]).parent.name == r["predictions"][0]["label"] for r in results)


@pytest.mark.slow
def test_predict_on_the_digits_test_folder_matches_the_runs_evaluation(digits_run, shared_dir, capsys):
    from PIL import Image

    workdir, summary = digits_run
    info = checkpoint.read_model_info(workdir / "model")
    assert info["class_names"] == [str(i) for i in range(10)]
    pp = info["preprocessing"]
    assert (pp["image_size"], pp["channels"], pp["crop"]) == (8, 1, "none") and len(pp["mean"]) == 1

    test_dir = shared_dir / "data" / "digits" / "test"
    results = predict(workdir, test_dir, top_k=3, batch_size=64)  # a workdir: its model/
    assert len(results) == summary["final_eval"]["count"] == 359
    assert num_correct(results) == round(summary["final_eval"]["accuracy"] * 359)  # the run reports a float32
    assert summary["final_eval"]["accuracy"] > 0.3  # learned something (chance: 0.1)
    p = results[0]["predictions"]
    assert len(p) == 3 and p[0]["probability"] >= p[1]["probability"] >= p[2]["probability"]

    pre = pretrained.from_pretrained(workdir / "model")
    array = np.asarray(Image.open(next((test_dir / "4").iterdir())))  # uint8 [8, 8]
    assert predict(pre, [array], top_k=1)[0]["image"] == 0

    files = sorted((test_dir / "7").iterdir())[:2]
    assert predict_main(["--model", str(workdir / "model"), *map(str, files), "--top-k", "2", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert [r["image"] for r in printed] == list(map(str, files)) and len(printed[0]["predictions"]) == 2
    assert predict_main(["--model", str(workdir / "model"), str(files[0])]) == 0
    assert capsys.readouterr().out.startswith(f"{files[0]}\n  1. ")


@pytest.mark.slow
def test_export_matches_the_model_and_serves_without_flax(digits_run, shared_dir, tmp_path):
    from cvt_flax.export import export_model, load_exported

    workdir, summary = digits_run
    out = export_model(workdir / "model", tmp_path / "exported", platforms=["cpu"])
    model, variables, info = pretrained.from_pretrained(workdir)
    exported = load_exported(out)
    x = np.random.default_rng(0).standard_normal((5, 8, 8, 1)).astype(np.float32)
    logits, probs = exported(x)
    np.testing.assert_allclose(logits, np.asarray(model.apply(variables, x)), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)
    assert exported(x[:2])[0].shape == (2, 10)  # symbolic batch dimension
    results = predict(out, shared_dir / "data" / "digits" / "test")
    assert num_correct(results) == round(summary["final_eval"]["accuracy"] * 359)
    # A workdir with checkpoints only (an interrupted run): its latest checkpoint, with the same metadata.
    shutil.copytree(workdir / "checkpoints", tmp_path / "ckpt_only" / "checkpoints")
    from_ckpt = pretrained.from_pretrained(tmp_path / "ckpt_only")
    assert (
        from_ckpt.info["class_names"] == info["class_names"]
        and from_ckpt.info["preprocessing"] == info["preprocessing"]
    )
    np.testing.assert_allclose(logits_of(from_ckpt, x), logits, atol=1e-5, rtol=1e-5)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "logits.npy", logits)

    # A fresh process: the package's loader and the copy beside the export, neither importing flax.
    script = f"""
import sys, numpy as np
from cvt_flax.serving import load_exported
sys.path.insert(0, {str(out)!r})
import cvt_serving
x, ref = np.load({str(tmp_path / "x.npy")!r}), np.load({str(tmp_path / "logits.npy")!r})
for loader in (load_exported, cvt_serving.load_exported):
    logits, probs = loader({str(out)!r})(x)
    assert np.abs(logits - ref).max() < 1e-6, np.abs(logits - ref).max()
top = cvt_serving.load_exported({str(out)!r}).predict([{str(next((shared_dir / "data/digits/test/3").iterdir()))!r}])
assert len(top[0]["predictions"]) == 5
bad = sorted(m for m in sys.modules if m.split(".")[0] == "flax" or m.startswith("cvt_flax.models"))
assert not bad, bad
print("ok")
"""
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]


@pytest.mark.slow
def test_saved_model_matches_the_export(digits_run, tmp_path):
    tf = pytest.importorskip("tensorflow")
    from cvt_flax.export import SAVED_MODEL_DIR, load_exported
    from cvt_flax.export import main as export_main

    workdir, _ = digits_run
    out = tmp_path / "exported"
    assert export_main(["--model", str(workdir), "--output", str(out), "--saved-model", "--platforms", "cpu"]) == 0
    x = np.random.default_rng(1).standard_normal((3, 8, 8, 1)).astype(np.float32)
    served = tf.saved_model.load(str(out / SAVED_MODEL_DIR)).signatures["serving_default"](images=tf.constant(x))
    logits, probs = load_exported(out)(x)
    np.testing.assert_allclose(served["logits"].numpy(), logits, atol=1e-5)
    np.testing.assert_allclose(served["probabilities"].numpy(), probs, atol=1e-6)
    assert export_main(["--model", str(workdir), "--output", str(out)]) == 2  # not empty, no --overwrite


def test_feature_probe_of_a_trained_model(digits_run, shared_dir, capsys):
    """benchmarks/feature_probe.py: nearest-class-mean accuracy of each stage's features, trained vs random."""
    from benchmarks import feature_probe

    workdir, _ = digits_run
    rows = feature_probe.probe(str(workdir / "model"), str(shared_dir / "data" / "digits"), per_class=5, seed=0)
    names = [r["features"] for r in rows]
    assert names[:4] == ["pixels", "stage0", "stage1", "stage2"] and "pre_logits" in names
    assert all(0.0 <= r["pretrained"] <= 1.0 for r in rows)
    assert rows[0]["pretrained"] > 0.5  # 5 digits per class, raw pixels: far above chance
    assert all(0.0 <= r["random"] <= 1.0 for r in rows[1:])
    assert any(r["pretrained"] != r["random"] for r in rows[1:])  # the random network is a different one
    assert feature_probe.nearest_class_mean(np.eye(2), np.array([0, 1]), np.eye(2), np.array([0, 1])) == 1.0


@pytest.mark.slow
def test_saved_model_of_an_hf_erf_gelu_model_loads_in_tensorflow(tiny_hf, tmp_path):
    """An HF-converted CvT (exact erf GELU) exports a SavedModel that TensorFlow's own loader runs, equal to torch
    and to the jax.export artefact; the program holds no StableHLO composite (which TF 2.21 cannot read)."""
    tf = pytest.importorskip("tensorflow")
    from jax import export as jax_export

    from cvt_flax.export import SAVED_MODEL_DIR, load_exported
    from cvt_flax.export import main as export_main

    hf_dir, x, ref = tiny_hf
    out = tmp_path / "exported"
    assert export_main(["--model", str(hf_dir), "--output", str(out), "--saved-model", "--platforms", "cpu"]) == 0
    exported = jax_export.deserialize(bytearray((out / serving.EXPORT_FILE).read_bytes()))
    assert "composite" not in exported.mlir_module()
    served = tf.saved_model.load(str(out / SAVED_MODEL_DIR)).signatures["serving_default"](images=tf.constant(x))
    logits, _ = load_exported(out)(x)
    np.testing.assert_allclose(served["logits"].numpy(), logits, atol=1e-5)
    np.testing.assert_allclose(served["logits"].numpy(), ref, atol=1e-4)


@pytest.mark.parametrize("name", ["photo.jpg", "notes.pth", "weights.safetensors"])
def test_a_file_that_is_not_a_checkpoint_says_so(tmp_path, capsys, name):
    """predict, export and from_pretrained: one line naming what --model accepts; no pickle advice."""
    from cvt_flax.export import main as export_main

    bad = tmp_path / name
    bad.write_bytes(b"\xff\xd8\xff\xe0 not a checkpoint" * 4)
    expected = f"{bad} is not a CvT checkpoint (expected a .pth/.bin/.safetensors file, an HF directory with " \
               "config.json, a model directory with model.json, or a hub id)"  # fmt: skip
    assert export_main(["--model", str(bad), "--output", str(tmp_path / "out")]) == 2
    assert predict_main(["--model", str(bad), str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.count(expected) == 2 and "pickle" not in err, err
    with pytest.raises(pretrained.PretrainedError, match="is not a CvT checkpoint"):
        pretrained.from_pretrained(str(bad))
