"""Where CLAP weights come from: a Hugging Face repo in transformers' layout (through the hub
cache) or a local folder in the same layout: ``config.json`` (ClapConfig) + ``model.safetensors``
/ ``pytorch_model.bin``, ``preprocessor_config.json`` (ClapFeatureExtractor) and, for
``show_pred``, the RoBERTa tokenizer files.

Resolution (:mod:`video_features.utils.hf_hub`, shared with videomae): ``checkpoint_path`` (a
folder, or a weights file with ``model_name`` giving the config) -> ``model_name`` as a local
folder -> the hub cache -> a download into the hub cache (unless offline) -> a one-line
:class:`WeightsError` naming ``hf download <repo>``. Random weights only with
``allow_random_weights``; they are built from the model's ``config.json`` or, for
laion/clap-htsat-unfused and laion/clap-htsat-fused, from the built-in configuration below
(transformers' ClapConfig defaults are that HTSAT-tiny + RoBERTa-base architecture), so that
benchmarks and smoke tests run offline.

Only the audio tower (``audio_model.*``, ``audio_projection.*`` of the ClapModel checkpoint) is
built and loaded, strictly; the text tower (``text_model.*``, ``text_projection.*``,
``logit_scale_a``) only for ``show_pred``.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from video_features.utils import hf_hub
from video_features.utils.errors import ConfigError, WeightsError, require
from video_features.utils.hf_hub import ExtraFiles, Source, fetch_hint, model_ident, read_state_dict
from video_features.utils.weights import WeightCard, check_keys, register_card

log = logging.getLogger(__name__)

DEFAULT_MODEL = "laion/clap-htsat-unfused"
#: repo id -> enable_fusion; every one takes 10 s clips at 48 kHz (max_length_s 10)
KNOWN_MODELS = {
    "laion/clap-htsat-unfused": False,
    "laion/clap-htsat-fused": True,
    "laion/larger_clap_general": None,            # None: read from its config.json
    "laion/larger_clap_music_and_speech": None,
    "laion/larger_clap_music": None,
}
#: repos whose architecture is built in (random weights without config.json)
BUILT_IN = ("laion/clap-htsat-unfused", "laion/clap-htsat-fused")
MAX_LENGTH_S = 10.0
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
                   "special_tokens_map.json")
SOUND_LABELS = Path(__file__).resolve().parent / "labels" / "sounds.txt"


def import_transformers() -> Any:
    return require("transformers", "feature_type clap")


#: what show_pred's texts need beyond the audio model: the RoBERTa tokenizer
TOKENIZER = ExtraFiles(TOKENIZER_FILES, "tokenizer_config.json", "the tokenizer files (show_pred)")


def resolve(cfg: Any, random_weights: bool, need_tokenizer: bool = False) -> Source:
    """Find the files ``cfg`` loads (see the module docstring for the order); the built-in
    configs do without the hub unless the tokenizer is needed too."""
    return hf_hub.resolve(cfg, random_weights, label="clap",
                          built_in=() if need_tokenizer else BUILT_IN,
                          extra=TOKENIZER if need_tokenizer else None,
                          offline_text=hf_hub.CACHE_LACKS)


def card_for(cfg: Any) -> WeightCard:
    """The card identifying the model (repo id + revision, or the local folder); the record
    beside each output adds the sha256 of the weights file actually used."""
    ident, url = model_ident(cfg.model_name, cfg.get("revision"))
    return register_card(WeightCard(
        name=f"clap:{ident}",
        url=url,
        sha256="",  # the hub checks its own downloads; the record holds the file's sha256
        filename="config.json + model.safetensors (or pytorch_model.bin) + "
                 "preprocessor_config.json, Hugging Face layout",
        layout="transformers ClapModel state dict: audio_model.audio_encoder.* (HTSAT: "
               "patch_embed.*, layers.N.blocks.M.attention.self.*, batch_norm.*, norm.*; "
               "patch_embed.fusion_model.* + mel_conv2d.* when fused), audio_projection."
               "linear1/2.*, text_model.* (RoBERTa), text_projection.*, logit_scale_a/t",
        preprocessing="the repo's ClapFeatureExtractor (preprocessor_config.json): 48 kHz mono, "
                      "windows repeat-padded to max_length_s (10 s), reflect-padded 1024-point "
                      "periodic Hann STFT hop 480, power, 64 mel bands (htk for "
                      "truncation=fusion, slaney otherwise), 10 log10; run in torch on the device",
        extra={"model_id": ident},
    ))


def weights_file_for(cfg: Any) -> str | None:
    """The weights file ``cfg`` loads (resolving / downloading it), or None for random weights."""
    if cfg.allow_random_weights and not cfg.get("checkpoint_path"):
        return None  # the rule of use_random_weights, without its log line (logged at load)
    return str(resolve(cfg, random_weights=False).weights)


def build_config(src: Source) -> Any:
    """ClapConfig from the source's config.json or, for the built-in repos, the built-in one."""
    tf = import_transformers()
    if src.folder is not None:
        path = src.folder / "config.json"
        try:
            raw = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise WeightsError(f"cannot read {path}: {exc}") from None
        if str(raw.get("model_type", "")).lower() != "clap":
            raise ConfigError(f"{src.model_id}: model_type {raw.get('model_type')!r} is not clap "
                              "(a ClapModel config.json is expected)")
        return tf.ClapConfig.from_pretrained(str(src.folder), local_files_only=True)
    fused = KNOWN_MODELS[src.model_id]
    # transformers' defaults are the HTSAT-tiny audio tower + RoBERTa-base text tower of these
    return tf.ClapConfig(audio_config={"enable_fusion": bool(fused)})


def feature_extractor_for(src: Source, config: Any) -> Any:
    """The repo's ClapFeatureExtractor; without preprocessor_config.json, LAION's settings
    (50-14000 Hz, repeatpad; fusion truncation for fused models, rand_trunc otherwise)."""
    tf = import_transformers()
    if src.folder is not None and (src.folder / "preprocessor_config.json").is_file():
        return tf.ClapFeatureExtractor.from_pretrained(str(src.folder), local_files_only=True)
    fused = bool(config.audio_config.enable_fusion)
    values = dict(frequency_min=50, frequency_max=14000, padding="repeatpad",
                  truncation="fusion" if fused else "rand_trunc")
    if src.folder is not None:
        log.info("%s: no preprocessor_config.json; using LAION CLAP's front end %s",
                 src.model_id, values)
    return tf.ClapFeatureExtractor(**values)


def _part(state: dict, prefixes: tuple[str, ...]) -> dict:
    return {k: v for k, v in state.items() if k.startswith(prefixes)}


def _load_strict(net: Any, state: dict, what: str, fill: tuple[str, ...]) -> None:
    """Strict load; buffers whose names end in ``fill`` (counters, index tables that the module
    computes itself) are taken from the module where a checkpoint lacks them."""
    expected = net.state_dict()
    for key, value in expected.items():
        if key.endswith(fill) and key not in state:
            state[key] = value
    check_keys(state, expected, what)
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise WeightsError(f"{what}: {str(exc).splitlines()[0]}") from None


def build_audio_tower(config: Any, state: dict | None) -> Any:
    """ClapAudioModelWithProjection (audio_model + audio_projection, the ClapModel's own key
    names) with the checkpoint's audio keys loaded strictly; random weights for ``state=None``."""
    tf = import_transformers()
    net = tf.ClapAudioModelWithProjection(config.audio_config)
    if state is not None:
        _load_strict(net, _part(state, ("audio_model.", "audio_projection.")),
                     "clap audio tower", ("num_batches_tracked", "relative_position_index"))
    return net.eval()


def build_text_tower(config: Any, state: dict | None) -> tuple[Any, float]:
    """ClapTextModelWithProjection and the audio logit scale (``exp(logit_scale_a)``)."""
    import math

    tf = import_transformers()
    net = tf.ClapTextModelWithProjection(config.text_config)
    scale = math.log(config.logit_scale_init_value)
    if state is not None:
        _load_strict(net, _part(state, ("text_model.", "text_projection.")), "clap text tower",
                     ("position_ids", "token_type_ids"))
        if "logit_scale_a" in state:
            scale = float(state["logit_scale_a"])
    return net.eval(), math.exp(scale)


def tokenizer_for(src: Source) -> Any:
    """The repo's tokenizer (RoBERTa's byte-level BPE), needed for show_pred's texts."""
    tf = import_transformers()
    if src.folder is None or not (src.folder / "tokenizer_config.json").is_file():
        hint = fetch_hint(src.model_id, src.revision) if src.folder is None else \
            f"put the tokenizer files ({', '.join(TOKENIZER_FILES)}) into {src.folder}"
        raise WeightsError(f"show_pred: the tokenizer of {src.model_id} is not available; {hint}")
    return tf.AutoTokenizer.from_pretrained(str(src.folder), local_files_only=True)


__all__ = ["BUILT_IN", "DEFAULT_MODEL", "KNOWN_MODELS", "MAX_LENGTH_S", "SOUND_LABELS", "Source",
           "build_audio_tower", "build_config", "build_text_tower", "card_for",
           "feature_extractor_for", "import_transformers", "read_state_dict", "resolve",
           "tokenizer_for", "weights_file_for"]
