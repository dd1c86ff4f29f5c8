"""Benchmark the data pipeline: samples/s from local shards vs a local S3 server (moto), 1 and 2 workers, with
and without image preprocessing.  Everything is generated locally; nothing is downloaded.

  python tools/bench_data.py --samples 1200 --json bench_data.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import tempfile
import time

from PIL import Image

from mole_ds.data import DataConfig, DomainSource, ShardConfig, build_loader, shard_dataset, storage
from mole_ds.models import build_tiny_processor


def make_data(root: str, n: int, image_px: int) -> list[DomainSource]:
    """Three domains, every sample with a PNG image of image_px x image_px (JPEG for 'document')."""
    out = []
    for d_i, name in enumerate(("general", "document", "medical")):
        img_dir = os.path.join(root, f"{name}_images")
        os.makedirs(img_dir, exist_ok=True)
        recs = []
        for i in range(n // 3):
            ext = "jpg" if name == "document" else "png"
            Image.effect_noise((image_px, image_px), 40 + i % 50).convert("RGB").save(os.path.join(img_dir, f"{i}.{ext}"))
            recs.append({"id": f"{name}-{i}", "image": f"{i}.{ext}", "conversations": [
                {"from": "human", "value": f"<image>\nWhat is shown in the {name} picture number {i}?"},
                {"from": "gpt", "value": f"It shows a {name} scene; the value is {i * 7 % 100}."}]})
        p = os.path.join(root, f"{name}.json")
        with open(p, "w") as f:
            json.dump(recs, f)
        out.append(DomainSource(name, p, img_dir))
    return out


def time_epoch(urls: str, processor, workers: int, process_images: bool, batch_size: int) -> tuple[float, int]:
    cfg = DataConfig(urls=urls, batch_size=batch_size, num_workers=workers, max_length=512, shuffle_buffer=64,
                     process_images=process_images)
    loader = build_loader(cfg, processor, rank=0, world_size=1)
    t = time.perf_counter()
    n = sum(len(b["ids"]) for b in loader)
    return n / (time.perf_counter() - t), n


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=3000)
    ap.add_argument("--image-px", type=int, default=128, help="side of the generated source images")
    ap.add_argument("--max-samples", type=int, default=100, help="samples per shard")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3, help="epochs per cell; the best is reported")
    ap.add_argument("--json", help="write the results here")
    a = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one access-log line per request otherwise

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    os.environ.update(AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}", AWS_ACCESS_KEY_ID="bench",
                      AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
    storage.reset_s3_client()
    rows = []
    try:
        with tempfile.TemporaryDirectory() as root:
            domains = make_data(root, a.samples, a.image_px)
            local = os.path.join(root, "shards")
            for out in (local, "s3://bench/shards"):
                shard_dataset(ShardConfig(domains, out, max_samples=a.max_samples, workers=2, progress=False))
            processor = build_tiny_processor()
            for process_images in (False, True):
                for workers in (1, 2):
                    cell = {"workers": workers, "image_preprocessing": process_images}
                    best = {"local": 0.0, "s3": 0.0}
                    # Alternate the sources within each repeat so both see the same background load.
                    for _ in range(a.repeats):
                        for name, urls in (("local", local + "/"), ("s3", "s3://bench/shards/")):
                            rate, n = time_epoch(urls, processor, workers, process_images, a.batch_size)
                            best[name] = max(best[name], rate)
                            cell["samples"] = n
                    cell["local_samples_per_s"] = round(best["local"], 1)
                    cell["s3_samples_per_s"] = round(best["s3"], 1)
                    cell["s3_over_local"] = round(cell["s3_samples_per_s"] / cell["local_samples_per_s"], 3)
                    rows.append(cell)
    finally:
        server.stop()

    print(f"{'workers':>7} {'img proc':>8} {'local/s':>10} {'s3/s':>10} {'s3/local':>9}")
    for r in rows:
        print(f"{r['workers']:>7} {str(r['image_preprocessing']):>8} {r['local_samples_per_s']:>10.1f} "
              f"{r['s3_samples_per_s']:>10.1f} {r['s3_over_local']:>9.3f}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"config": vars(a), "results": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
