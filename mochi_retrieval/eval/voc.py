"""Pascal VOC detection data in its folder layout, and its COCO-format ground truth.

Layout (``ROOT`` may also be a ``VOCdevkit`` parent)::

    ROOT/VOC2007/Annotations/<id>.xml
    ROOT/VOC2007/JPEGImages/<id>.jpg
    ROOT/VOC2007/ImageSets/Main/<split>.txt      one image id a line

A set is named ``"VOC2007/trainval"`` (year folder / split file). Boxes are
converted from VOC's 1-based inclusive pixels to 0-based ``x1, y1, x2, y2``
as detectron2 does. Objects marked ``difficult`` are left out of training
and are "crowd" (ignored) regions in the COCO ground truth used for testing,
so they neither count as misses nor punish a detection.
"""

from __future__ import annotations

import logging
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor
from torch.utils.data import Dataset

from mochi_retrieval.eval.errors import EvalInputError

logger = logging.getLogger(__name__)

VOC_CLASSES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
               "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor")


@dataclass
class VOCImage:
    """One annotated image: boxes (K, 4) 0-based x1, y1, x2, y2; names and difficult flags per box."""

    path: Path
    width: int
    height: int
    boxes: list[list[float]]
    names: list[str]
    difficult: list[bool]


def resolve_root(root: str | Path, sets: Sequence[str]) -> Path:
    """The folder that holds the year folders; EvalInputError naming every missing piece."""
    root = Path(root)
    if not root.is_dir():
        raise EvalInputError(f"data folder {root} does not exist or is not a directory")
    if (root / "VOCdevkit").is_dir() and not any((root / s.split("/")[0]).is_dir() for s in sets):
        root = root / "VOCdevkit"
    missing = []
    for s in sets:
        year, _, split = s.partition("/")
        for need in (f"{year}/Annotations", f"{year}/JPEGImages", f"{year}/ImageSets/Main/{split}.txt"):
            if not (root / need).exists():
                missing.append(need)
    if missing:
        raise EvalInputError(f"{root} is not a VOC-format folder for sets {', '.join(sets)}: "
                             f"missing {', '.join(dict.fromkeys(missing))}")
    return root


def parse_annotation(xml_path: Path, image_path: Path) -> VOCImage:
    """Read one VOC XML file."""
    tree = ET.parse(xml_path).getroot()
    size = tree.find("size")
    width, height = int(size.findtext("width")), int(size.findtext("height"))
    boxes, names, difficult = [], [], []
    for obj in tree.iter("object"):
        bb = obj.find("bndbox")
        x1, y1, x2, y2 = (float(bb.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax"))
        boxes.append([x1 - 1.0, y1 - 1.0, x2, y2])
        names.append(obj.findtext("name").strip())
        difficult.append(obj.findtext("difficult", "0").strip() == "1")
    return VOCImage(image_path, width, height, boxes, names, difficult)


def load_sets(root: Path, sets: Sequence[str]) -> list[VOCImage]:
    """All images of the named sets, in file order."""
    images = []
    for s in sets:
        year, _, split = s.partition("/")
        ids = [line.split()[0] for line in (root / year / "ImageSets/Main" / f"{split}.txt").read_text().splitlines()
               if line.strip()]
        for i in ids:
            xml, jpg = root / year / "Annotations" / f"{i}.xml", root / year / "JPEGImages" / f"{i}.jpg"
            if not xml.is_file() or not jpg.is_file():
                raise EvalInputError(f"{s}: image id {i!r} lacks {xml.name if not xml.is_file() else jpg.name}")
            images.append(parse_annotation(xml, jpg))
    if not images:
        raise EvalInputError(f"{root}: the sets {', '.join(sets)} list no images")
    return images


class VOCDataset(Dataset):
    """(image (C, H, W) float in [0, 1], target) pairs for torchvision detection models.

    ``target``: ``boxes`` (K, 4) float32, ``labels`` (K,) int64 in 1..C (0 is
    background), ``image_id`` int. Difficult objects are dropped when
    ``train`` is true. ``grey`` loads images as one channel.
    """

    def __init__(self, images: list[VOCImage], classes: Sequence[str], train: bool, grey: bool = False) -> None:
        self.images, self.train, self.grey = images, train, grey
        self.class_index = {c: i + 1 for i, c in enumerate(classes)}
        unknown = sorted({n for im in images for n in im.names} - set(self.class_index))
        if unknown:
            raise EvalInputError(f"annotations name classes not in the class list: {', '.join(unknown[:10])}")

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[Tensor, dict[str, Tensor]]:
        from PIL import Image
        from torchvision.transforms.functional import pil_to_tensor

        im = self.images[i]
        keep = [j for j in range(len(im.boxes)) if not (self.train and im.difficult[j])]
        with Image.open(im.path) as pil:
            img = pil_to_tensor(pil.convert("L" if self.grey else "RGB")).float() / 255.0
        boxes = torch.tensor([im.boxes[j] for j in keep], dtype=torch.float32).reshape(-1, 4)
        labels = torch.tensor([self.class_index[im.names[j]] for j in keep], dtype=torch.int64)
        return img, {"boxes": boxes, "labels": labels, "image_id": torch.tensor(i)}


def coco_ground_truth(images: list[VOCImage], classes: Sequence[str]) -> dict:
    """COCO-format ground truth; image ids are list positions, category ids 1..C, difficult = crowd."""
    index = {c: i + 1 for i, c in enumerate(classes)}
    anns = []
    for img_id, im in enumerate(images):
        for (x1, y1, x2, y2), name, diff in zip(im.boxes, im.names, im.difficult):
            w, h = x2 - x1, y2 - y1
            anns.append({"id": len(anns) + 1, "image_id": img_id, "category_id": index[name],
                         "bbox": [x1, y1, w, h], "area": w * h, "iscrowd": int(diff)})
    return {"images": [{"id": i, "width": im.width, "height": im.height} for i, im in enumerate(images)],
            "annotations": anns, "categories": [{"id": i + 1, "name": c} for i, c in enumerate(classes)]}
