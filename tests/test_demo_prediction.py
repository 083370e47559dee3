"""The prediction `make demo` ends with: a val image and the box of one of its objects."""

import json

from dinor1.data_pipelines.synthetic import SyntheticConfig, generate_synthetic_coco
from dinor1.demo import pick_val_prompt


def test_the_prompt_is_a_real_object_of_a_class_seen_twice_in_its_image(tmp_path):
    coco = tmp_path / "coco"
    generate_synthetic_coco(coco, SyntheticConfig(image_size=64, num_train=1, num_val=12,
                                                   num_support=1, seed=3))
    image, box, name = pick_val_prompt(coco)
    data = json.loads((coco / "annotations" / "instances_val.json").read_text())
    entry = next(im for im in data["images"] if im["file_name"] == image.name)
    names = {c["id"]: c["name"] for c in data["categories"]}
    objects = [a for a in data["annotations"] if a["image_id"] == entry["id"]]
    x0, y0, x1, y1 = box
    assert image.is_file() and 0 <= x0 < x1 <= 64 and 0 <= y0 < y1 <= 64
    same = [a for a in objects if names[a["category_id"]] == name]
    assert len(same) >= 2  # another one for the prompt to find
    assert any(abs(a["bbox"][0] - x0) <= 1 and abs(a["bbox"][1] - y0) <= 1 for a in same)
