"""Where VideoMAE weights come from: a Hugging Face repo (through the hub cache) or a local folder
in the same layout (``config.json`` + ``model.safetensors`` / ``pytorch_model.bin``, optionally
``preprocessor_config.json``).

Resolution (:mod:`video_features.utils.hf_hub`, shared with clap): an explicit ``checkpoint_path``
(folder or weights file) -> ``model_name`` as a local folder -> the hub cache -> a download into
the hub cache (unless offline) -> a one-line :class:`WeightsError` naming the repo id and the
command that fetches it. Random weights only
with ``allow_random_weights`` (:func:`utils.weights.use_random_weights`); they are built from the
model's ``config.json``, or for the MCG-NJU repos from the built-in table below, so that
benchmarks and smoke tests run offline.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from video_features.models.hf_video import weights as hf_video_weights
from video_features.utils import hf_hub
from video_features.utils.errors import ConfigError
from video_features.utils.hf_hub import Source, model_ident
from video_features.utils.weights import WeightCard, register_card

log = logging.getLogger(__name__)

DEFAULT_MODEL = "MCG-NJU/videomae-base-finetuned-kinetics"
KINETICS_LABELS = Path(__file__).resolve().parent.parent / "i3d" / "labels" / "kinetics400.txt"

# Architectures of the MCG-NJU conversions (transformers' convert_videomae_to_pytorch.py); every
# other field keeps VideoMAEConfig's default (224 px, patch 16, 16 frames, tubelet 2, qv bias).
_SIZES = {
    "base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                 intermediate_size=3072),
    "large": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                  intermediate_size=4096, decoder_num_hidden_layers=12,
                  decoder_num_attention_heads=8, decoder_hidden_size=512,
                  decoder_intermediate_size=2048),
    "huge": dict(hidden_size=1280, num_hidden_layers=32, num_attention_heads=16,
                 intermediate_size=5120, decoder_num_hidden_layers=12,
                 decoder_num_attention_heads=8, decoder_hidden_size=640,
                 decoder_intermediate_size=2560),
}
#: repo id -> (size, labels: "kinetics400" | "ssv2" | None for self-supervised only)
KNOWN_MODELS = {
    "MCG-NJU/videomae-base-finetuned-kinetics": ("base", "kinetics400"),
    "MCG-NJU/videomae-base-short-finetuned-kinetics": ("base", "kinetics400"),
    "MCG-NJU/videomae-large-finetuned-kinetics": ("large", "kinetics400"),
    "MCG-NJU/videomae-huge-finetuned-kinetics": ("huge", "kinetics400"),
    "MCG-NJU/videomae-base-finetuned-ssv2": ("base", "ssv2"),
    "MCG-NJU/videomae-base-short-finetuned-ssv2": ("base", "ssv2"),
    "MCG-NJU/videomae-base": ("base", None),
    "MCG-NJU/videomae-base-short": ("base", None),
    "MCG-NJU/videomae-large": ("large", None),
    "MCG-NJU/videomae-base-ssv2": ("base", None),
    "MCG-NJU/videomae-base-short-ssv2": ("base", None),
}
#: the preprocessing of VideoMAE's own training code (short side 224, centre crop 224, bilinear,
#: ImageNet mean/std); used only where a model has no preprocessor_config.json of its own
FALLBACK_PROCESSOR = dict(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224},
                          resample=2, image_mean=[0.485, 0.456, 0.406],
                          image_std=[0.229, 0.224, 0.225])
V2_HINT = ("VideoMAE V2 (OpenGVLab/VideoMAEv2-*) ships its network as remote code "
           "(trust_remote_code) and is not supported; use a VideoMAE repo such as "
           f"{DEFAULT_MODEL} or a local folder in transformers' VideoMAE layout")


def import_transformers() -> Any:
    """transformers, or a ConfigError naming the pip package (it is optional for the tool)."""
    return hf_video_weights.import_transformers("videomae")


def is_v2_name(name: str) -> bool:
    return "videomaev2" in name.lower().replace("-", "").replace("_", "")


def resolve(cfg: Any, random_weights: bool) -> Source:
    """Find the files ``cfg`` loads. With ``random_weights`` no weights file is needed, only a
    config: a local folder's, the built-in table's (known repos), or the hub's."""
    return hf_hub.resolve(cfg, random_weights, label="videomae", built_in=KNOWN_MODELS)


def card_for(cfg: Any) -> WeightCard:
    """The card that identifies the model (repo id + revision, or the local folder); the record
    beside each output adds the sha256 of the weights file actually used."""
    ident, url = model_ident(cfg.model_name, cfg.get("revision"))
    labels = KNOWN_MODELS.get(cfg.model_name, (None, None))[1]
    return register_card(WeightCard(
        name=f"videomae:{ident}",
        url=url,
        sha256="",  # the hub checks its own downloads; the record holds the file's sha256
        filename="config.json + model.safetensors (or pytorch_model.bin), Hugging Face layout",
        layout="transformers VideoMAE state dict (videomae.embeddings.patch_embeddings."
               "projection.*, videomae.encoder.layer.N.* with attention.attention.q_bias / "
               "v_bias, fc_norm.* + classifier.* when fine-tuned, videomae.layernorm.* + "
               "decoder.* when self-supervised)",
        preprocessing="the repo's VideoMAEImageProcessor (preprocessor_config.json): shortest "
                      "edge resize (torchvision kernel, antialiased), centre crop, rescale, "
                      "mean/std",
        num_classes={"kinetics400": 400, "ssv2": 174}.get(labels or ""),
        extra={"model_id": ident},
    ))


def weights_file_for(cfg: Any) -> str | None:
    """The weights file ``cfg`` loads (resolving / downloading it), or None for random weights."""
    return hf_video_weights.weights_file_for(cfg, "videomae", KNOWN_MODELS)


def build_config(src: Source) -> Any:
    """VideoMAEConfig from the source's config.json or, for known repos, the built-in table."""
    tf = import_transformers()
    if src.folder is not None:
        raw = hf_video_weights.read_raw_config(src)
        mtype = str(raw.get("model_type", ""))
        if mtype.lower() != "videomae":
            if is_v2_name(mtype) or raw.get("auto_map"):
                raise ConfigError(f"{src.model_id}: model_type {mtype!r}: {V2_HINT}")
            raise ConfigError(f"{src.model_id}: model_type {mtype!r} is not videomae")
        return tf.VideoMAEConfig.from_pretrained(str(src.folder), local_files_only=True)
    size, labels = KNOWN_MODELS[src.model_id]
    values: dict[str, Any] = dict(_SIZES[size])
    if labels:
        values.update(use_mean_pooling=True, architectures=["VideoMAEForVideoClassification"])
        if labels == "kinetics400":
            names = KINETICS_LABELS.read_text().splitlines()
            values.update(id2label=dict(enumerate(names)))
        else:
            values.update(num_labels=174)
    else:
        values.update(use_mean_pooling=False, architectures=["VideoMAEForPreTraining"])
    return tf.VideoMAEConfig(**values)


def processor_for(src: Source, config: Any) -> Any:
    """The HF VideoMAEImageProcessor holding the model's preprocessing settings (read from
    preprocessor_config.json; VideoMAE's training recipe where there is none)."""
    tf = import_transformers()
    if src.folder is not None and (src.folder / "preprocessor_config.json").is_file():
        return tf.VideoMAEImageProcessor.from_pretrained(str(src.folder), local_files_only=True)
    size = config.image_size if isinstance(config.image_size, int) else config.image_size[0]
    values = dict(FALLBACK_PROCESSOR, size={"shortest_edge": size},
                  crop_size={"height": size, "width": size})
    log.info("%s: no preprocessor_config.json; using VideoMAE's training preprocessing %s",
             src.model_id, values)
    return tf.VideoMAEImageProcessor(**values)
