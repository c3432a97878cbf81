"""CLAP checkpoints: the Hugging Face hub cache (or a local folder in transformers' layout), a
weight card per model, and the feature extractor settings that define the front end.

``model_name`` is a hub repo (laion/clap-htsat-unfused, laion/clap-htsat-fused,
laion/larger_clap_general, laion/larger_clap_music_and_speech, laion/larger_clap_music) or a
folder holding ``config.json`` + ``model.safetensors`` (and ``preprocessor_config.json``).
Offline without a cached copy the run stops naming the ``hf download`` command.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from video_features.models.videomae.weights import _hub_folder, read_state_dict, weights_in
from video_features.utils.errors import ConfigError, WeightsError
from video_features.utils.weights import WeightCard, register_card

log = logging.getLogger(__name__)

DEFAULT_MODEL = "laion/clap-htsat-unfused"
#: the published LAION CLAP checkpoints in transformers' layout, and whether they fuse
KNOWN_MODELS = {
    "laion/clap-htsat-unfused": False,
    "laion/clap-htsat-fused": True,
    "laion/larger_clap_general": False,
    "laion/larger_clap_music_and_speech": False,
    "laion/larger_clap_music": False,
}
SAMPLE_RATE = 48_000


def import_transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise ConfigError("feature_type clap needs the transformers package: "
                          "pip install transformers") from None
    return transformers


@dataclass(frozen=True)
class Source:
    model_id: str
    folder: Path | None    # config.json and preprocessor_config.json; None: built-in config
    weights: Path | None   # None: random weights


def resolve(cfg: Any, random_weights: bool) -> Source:
    """The files ``cfg`` loads: an explicit checkpoint, a local folder, or the hub cache."""
    name = cfg.model_name
    local = Path(name).expanduser()
    folder = local.resolve() if local.is_dir() else None
    explicit = cfg.get("checkpoint_path")
    if folder is not None and not (folder / "config.json").is_file():
        raise WeightsError(f"model_name {name!r} is a folder without config.json (expected "
                           "transformers' layout: config.json + model.safetensors)")
    if explicit:
        p = Path(explicit).expanduser()
        if not p.is_file():
            raise WeightsError(f"checkpoint_path {explicit!r} for clap does not exist")
        if folder is None and not (random_weights or name in KNOWN_MODELS):
            folder = _hub_folder(name, None, need_weights=False, label="clap")
        return Source(str(folder or name), folder, p.resolve())
    if folder is None:
        if random_weights and name in KNOWN_MODELS:
            return Source(name, None, None)
        folder = _hub_folder(name, None, need_weights=not random_weights, label="clap")
    weights = None if random_weights else weights_in(folder)
    if weights is None and not random_weights:
        raise WeightsError(f"clap: {folder} holds no model.safetensors or pytorch_model.bin")
    return Source(str(folder) if local.is_dir() else name, folder, weights)


def card_for(cfg: Any) -> WeightCard:
    name = cfg.model_name
    local = Path(name).expanduser()
    ident = str(local.resolve()) if local.is_dir() else name
    return register_card(WeightCard(
        name=f"clap:{ident}",
        url=local.resolve().as_uri() if local.is_dir() else f"https://huggingface.co/{name}",
        sha256="",  # the hub checks its downloads; the record holds the used file's sha256
        filename="config.json + model.safetensors (or pytorch_model.bin), Hugging Face layout",
        layout="transformers ClapModel state dict (audio_model.audio_encoder.patch_embed.*, "
               "audio_model.audio_encoder.layers.N.blocks.M.*, audio_projection.linear1/2.*, "
               "text_model.*, text_projection.*, logit_scale_a / logit_scale_t)",
        preprocessing="48 kHz mono; the repo's ClapFeatureExtractor: 1024-point periodic Hann "
                      "STFT, hop 480, power, 64 mel bands 0-14 kHz (htk for fused models, slaney "
                      "otherwise), 10 log10, windows of max_length_s repeat-padded",
        extra={"model_id": ident},
    ))


def weights_file_for(cfg: Any) -> str | None:
    if cfg.allow_random_weights and not cfg.get("checkpoint_path"):
        return None
    src = resolve(cfg, random_weights=False)
    return str(src.weights) if src.weights else None


def build(src: Source) -> tuple[Any, Any]:
    """(ClapModel in eval mode, ClapFeatureExtractor) of the source; weights loaded strictly."""
    tf = import_transformers()
    if src.folder is not None:
        config = tf.ClapConfig.from_pretrained(str(src.folder), local_files_only=True)
    else:  # random weights of a known model: transformers' default CLAP (HTSAT-tiny, 512-d)
        config = tf.ClapConfig()
        config.audio_config.enable_fusion = KNOWN_MODELS.get(src.model_id, False)
    fused = bool(config.audio_config.enable_fusion)
    if src.folder is not None and (src.folder / "preprocessor_config.json").is_file():
        fe = tf.ClapFeatureExtractor.from_pretrained(str(src.folder), local_files_only=True)
    else:
        fe = tf.ClapFeatureExtractor(truncation="fusion" if fused else "rand_trunc")
    model = tf.ClapModel(config)
    if src.weights is not None:
        state = read_state_dict(src.weights)
        state.pop("text_model.embeddings.position_ids", None)  # a buffer older files carry
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.endswith("position_ids")]
        if missing or unexpected:
            raise WeightsError(f"{src.weights} does not fit ClapModel ({src.model_id}): missing "
                               f"{missing[:3]}, unexpected {unexpected[:3]}")
    return model.eval(), fe
