"""Write a folder of PNG files with a CSV of labels per split (the layout examples/your_data.py reads) from
Fashion-MNIST, to try `searchsvc run configs/your-data-grid.yaml` on data that comes from your own code.

    python examples/make_your_data.py -o /tmp/your-data [--train 6000 --val 1000 --test 1000]
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from workers.data.sources import fashion_mnist  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-o", "--out", required=True, help="folder to write (images/ and train/val/test.csv)")
    parser.add_argument("--train", type=int, default=6000, help="training images (from Fashion-MNIST's train)")
    parser.add_argument("--val", type=int, default=1000, help="validation images (the next ones of its train)")
    parser.add_argument("--test", type=int, default=1000, help="test images (from its test split)")
    args = parser.parse_args()
    from PIL import Image

    train_x, train_y, test_x, test_y, _ = fashion_mnist(None, download=False)
    out = Path(args.out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    parts = {"train": (train_x[:args.train], train_y[:args.train]),
             "val": (train_x[args.train:args.train + args.val], train_y[args.train:args.train + args.val]),
             "test": (test_x[:args.test], test_y[:args.test])}
    for name, (images, labels) in parts.items():
        with open(out / f"{name}.csv", "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["file", "label"])
            for i, (image, label) in enumerate(zip(images, labels)):
                file = f"images/{name}-{i:06d}.png"
                Image.fromarray(image[0].numpy()).save(out / file)
                writer.writerow([file, int(label)])
        print(f"{name}: {len(labels)} images", flush=True)
    print(f"wrote {out}: searchsvc run configs/your-data-grid.yaml --set dataset.kwargs.root={out}")


if __name__ == "__main__":
    main()
