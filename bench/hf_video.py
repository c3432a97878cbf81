"""Speed of ``feature_type=hf_video`` per architecture: each model at the size of its published
base checkpoint (transformers' default config of that type, random weights, written with
``save_pretrained`` beside the processor settings of the published repo), run on the sample
videos. Prints, per model, the seconds of the model load and of the extraction, and frames/s and
clips/s of the extraction (decoding, the processor on the device, the network, pooling).

    python bench/hf_video.py                       # every model, CPU, sample/A.mp4 sample/B.mp4
    python bench/hf_video.py --models vjepa2 timesformer --device cuda:0
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def models(tf) -> dict:
    """name -> (published repo it stands for, model, processor)."""
    short = {"size": {"shortest_edge": 224}, "crop_size": {"height": 224, "width": 224}}
    return {
        "vjepa2": ("facebook/vjepa2-vitl-fpc64-256", lambda: tf.VJEPA2Model(tf.VJEPA2Config()),
                   lambda: tf.VJEPA2VideoProcessor(crop_size=256)),
        "timesformer": ("facebook/timesformer-base-finetuned-k400",
                        lambda: tf.TimesformerForVideoClassification(
                            tf.TimesformerConfig(num_labels=400)),
                        lambda: tf.VideoMAEImageProcessor(**short)),
        "vivit": ("google/vivit-b-16x2-kinetics400",
                  lambda: tf.VivitForVideoClassification(tf.VivitConfig(num_labels=400)),
                  lambda: tf.VivitVideoProcessor()),
        "xclip": ("microsoft/xclip-base-patch32", lambda: tf.XCLIPModel(tf.XCLIPConfig()),
                  lambda: tf.VideoMAEImageProcessor(**short)),
        "videomae": ("MCG-NJU/videomae-base-finetuned-kinetics",
                     lambda: tf.VideoMAEForVideoClassification(
                         tf.VideoMAEConfig(use_mean_pooling=True, num_labels=400)),
                     lambda: tf.VideoMAEImageProcessor(**short)),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="*", default=None)
    ap.add_argument("--videos", nargs="*", default=[str(ROOT / "sample/A.mp4"),
                                                    str(ROOT / "sample/B.mp4")])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch_size", type=int, default=1)
    args = ap.parse_args()

    import torch
    import transformers as tf

    from video_features.models.hf_video.extractor import HFVideoExtractor
    from video_features.utils.config import make_config

    table = models(tf)
    names = args.models or list(table)
    tmp = Path(tempfile.mkdtemp(prefix="vf-hfv-bench-"))
    print(f"device {args.device}, {torch.get_num_threads()} threads, videos "
          f"{', '.join(Path(v).name for v in args.videos)}")
    print("| model (stands for) | frames/clip | load s | extract s | frames/s | clips/s |")
    print("|---|---|---|---|---|---|")
    for name in names:
        repo, make_model, make_processor = table[name]
        folder = tmp / name
        torch.manual_seed(0)
        make_model().save_pretrained(folder)
        make_processor().save_pretrained(folder)
        cfg = make_config("hf_video", video_paths=args.videos, device=args.device,
                          model_name=str(folder), batch_size=args.batch_size, progress=False)
        t0 = time.perf_counter()
        ex = HFVideoExtractor(cfg, torch.device(args.device))
        load = time.perf_counter() - t0
        frames = clips = 0
        t0 = time.perf_counter()
        for video in args.videos:
            before = ex.frames_read
            out = ex.extract(video)
            frames += ex.frames_read - before
            clips += len(out["hf_video"])
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        took = time.perf_counter() - t0
        print(f"| {name} ({repo}) | {ex.stack} | {load:.1f} | {took:.1f} | {frames / took:.1f} | "
              f"{clips / took:.2f} |", flush=True)
        del ex


if __name__ == "__main__":
    main()
