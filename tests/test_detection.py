"""Detection transfer on a tiny VOC-format set of Fashion-MNIST items pasted on canvases."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from eval_helpers import TINY_DETECTION_YAML, make_run_folder, make_tiny_voc

from mochi_retrieval.eval.cli import main

pytest.importorskip("pycocotools")

from mochi_retrieval.eval.detection import (  # noqa: E402
    build_detector,
    evaluate_coco,
    load_detection_config,
)
from mochi_retrieval.eval.voc import VOCDataset, coco_ground_truth, load_sets, resolve_root  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def voc(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_voc(tmp_path_factory.mktemp("voc") / "voc")


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # standard stride-4 stem: 4x fewer positions than the small-image stem, so the test stays fast
    return make_run_folder(tmp_path_factory.mktemp("run") / "run", encoder_kwargs={"in_channels": 1})


@pytest.fixture()
def tiny_cfg(tmp_path: Path) -> Path:
    (tmp_path / "det.yaml").write_text(TINY_DETECTION_YAML)
    return tmp_path / "det.yaml"


def test_full_scale_config_loads() -> None:
    cfg = load_detection_config(REPO / "configs" / "voc_detection.yaml")
    assert cfg.iterations == 24_000 and cfg.batch_size == 16 and cfg.weight_decay == 1e-4
    assert cfg.train_sets == ["VOC2007/trainval", "VOC2012/trainval"] and len(cfg.classes) == 20


def test_config_rejects_unknown_keys(tmp_path: Path) -> None:
    (tmp_path / "bad.yaml").write_text("iterations: 10\nlearning_rate: 0.1\n")
    with pytest.raises(ValueError, match="unknown key 'learning_rate'"):
        load_detection_config(tmp_path / "bad.yaml")


def test_ground_truth_as_detections_gives_ap_one(voc: Path) -> None:
    root = resolve_root(voc, ["VOC2007/test"])
    images = load_sets(root, ["VOC2007/test"])
    classes = sorted({n for im in images for n in im.names})
    gt = coco_ground_truth(images, classes)
    dets = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
            for a in gt["annotations"]]
    assert evaluate_coco(gt, dets) == pytest.approx({"AP": 1.0, "AP50": 1.0, "AP75": 1.0})
    shifted = [{**d, "bbox": [d["bbox"][0] + 0.5 * d["bbox"][2], *d["bbox"][1:]]} for d in dets]  # IoU 1/3
    assert evaluate_coco(gt, shifted) == pytest.approx({"AP": 0.0, "AP50": 0.0, "AP75": 0.0})


def test_backbone_starts_from_encoder_weights(run: Path, tiny_cfg: Path) -> None:
    from mochi_retrieval.eval.models import load_model

    enc = load_model(run).encoder
    saved = torch.load(run / "encoder.pt", weights_only=True)["encoder"]
    det = build_detector(enc, 3, load_detection_config(tiny_cfg))
    body = det.backbone.body
    assert torch.equal(body.conv1.weight, saved["backbone.conv1.weight"])
    assert torch.equal(body.layer4[1].conv2.weight, saved["backbone.layer4.1.conv2.weight"])
    assert torch.equal(body.layer2[0].bn1.running_var, saved["backbone.layer2.0.bn1.running_var"])
    assert "FrozenBatchNorm2d" in type(body.bn1).__name__


def test_dataset_targets(voc: Path) -> None:
    images = load_sets(resolve_root(voc, ["VOC2007/trainval"]), ["VOC2007/trainval"])
    ds = VOCDataset(images, ["bag", "sneaker", "trouser"], train=True, grey=True)
    img, target = ds[1]
    assert img.shape == (1, 64, 64) and 0 <= img.min() and img.max() <= 1
    assert target["boxes"].shape == (2, 4) and set(target["labels"].tolist()) <= {1, 2, 3}
    b = target["boxes"]
    assert (b[:, 2] > b[:, 0]).all() and (b[:, 3] > b[:, 1]).all() and b.min() >= 0 and b.max() <= 64


def test_cli_detection_end_to_end(run: Path, voc: Path, tiny_cfg: Path, tmp_path: Path,
                                  monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    from pycocotools.cocoeval import COCOeval

    seen = []
    original = COCOeval.summarize

    def spy(self):
        original(self)
        seen.append(list(self.stats))

    monkeypatch.setattr(COCOeval, "summarize", spy)
    out = tmp_path / "det.json"
    assert main(["--detection", "--model", str(run), "--data", str(voc), "--detection-config", str(tiny_cfg),
                 "--output", str(out), "--device", "cpu", "--no-progress"]) == 0
    res = json.loads(out.read_text())
    assert set(res) == {"AP", "AP50", "AP75"}
    assert len(seen) == 1  # score_threshold 0: the detector returns boxes, so COCOeval ran
    assert [res["AP"], res["AP50"], res["AP75"]] == pytest.approx(seen[0][:3])  # its own stats[0:3]
    assert "AP50" in capsys.readouterr().out


def test_cli_not_a_voc_folder(run: Path, tmp_path: Path, tiny_cfg: Path, capsys) -> None:
    (tmp_path / "d" / "VOC2007" / "JPEGImages").mkdir(parents=True)
    assert main(["--detection", "--model", str(run), "--data", str(tmp_path / "d"),
                 "--detection-config", str(tiny_cfg)]) == 2
    err = capsys.readouterr().err
    assert "is not a VOC-format folder for sets VOC2007/trainval, VOC2007/test: missing VOC2007/Annotations" in err
    assert "VOC2007/ImageSets/Main/trainval.txt" in err and "Traceback" not in err
