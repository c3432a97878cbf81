"""Which CLIP network and checkpoint a config names, and how they are loaded.

Two sources:

* ``pretrained=openai`` (default): OpenAI's released checkpoints (openai/CLIP ``_MODELS``).
  Their URLs carry the file's full sha256; the files are TorchScript archives whose
  ``state_dict()`` is OpenAI's layout (``visual.conv1.weight``, ``transformer.resblocks.0.*``,
  ``text_projection``, ...), mostly fp16. A plain state dict in the same layout (fp16 or fp32,
  e.g. a fine-tuned model) loads as well, given with ``checkpoint_path``; ``model_name`` names its
  architecture. The network is open_clip's OpenAI architecture (QuickGELU), weights cast to fp32.
* any other ``pretrained``: an open_clip pretrained tag of the open_clip architecture
  ``model_name`` (``ViT-B-32`` + ``laion2b_s34b_b79k``, ``ViT-B-16-SigLIP`` + ``webli``, ...); the
  file comes from the Hugging Face hub cache (or open_clip's URL cache) and is loaded with
  open_clip's own checkpoint loader.

open_clip_torch is imported only here and in the extractor, never by other feature types.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from video_features.models.clip.preprocess import ImageRecipe, recipe_from_cfg
from video_features.utils.errors import ConfigError, WeightsError, require
from video_features.utils.hf_hub import hub_cache_dir
from video_features.utils.weights import (WeightCard, check_keys, get_card, load_state_dict, register_card,
                           resolve_checkpoint, sha256_of)

log = logging.getLogger(__name__)

_OPENAI_BASE = "https://openaipublic.azureedge.net/clip/models"
#: OpenAI name -> (sha256 published in the URL, file name, open_clip architecture)
OPENAI_MODELS: dict[str, tuple[str, str, str]] = {
    "RN50": ("afeb0e10f9e5a86da6080e35cf09123aca3b358a0c3e3b6c78a7b63bc04b6762", "RN50.pt", "RN50"),
    "RN101": ("8fa8567bab74a42d41c5915025a8e4538c3bdbe8804a470a72f30b0d94fab599", "RN101.pt", "RN101"),
    "RN50x4": ("7e526bd135e493cef0776de27d5f42653e6b4c8bf9e0f653bb11773263205fdd", "RN50x4.pt",
               "RN50x4"),
    "RN50x16": ("52378b407f34354e150460fe41077663dd5b39c54cd0bfd2b27167a4a06ec9aa", "RN50x16.pt",
                "RN50x16"),
    "RN50x64": ("be1cfb55d75a9666199fb2206c106743da0f6468c9d327f3e0d0a543a9919d9c", "RN50x64.pt",
                "RN50x64"),
    "ViT-B/32": ("40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af", "ViT-B-32.pt",
                 "ViT-B-32"),
    "ViT-B/16": ("5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f", "ViT-B-16.pt",
                 "ViT-B-16"),
    "ViT-L/14": ("b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836", "ViT-L-14.pt",
                 "ViT-L-14"),
    "ViT-L/14@336px": ("3035c92b350959924f9f00213499208652fc7ea050643e8b385c2dac08641f02",
                       "ViT-L-14-336px.pt", "ViT-L-14-336"),
}
OPENAI_NAMES = tuple(OPENAI_MODELS)
#: open_clip's spelling of the OpenAI models (``ViT-B-32`` with pretrained=openai)
_OPENAI_ALIASES = {arch: name for name, (_, _, arch) in OPENAI_MODELS.items()}
#: sizes of the context / image / vocabulary that OpenAI's TorchScript archives also store
_ARCHIVE_EXTRAS = ("input_resolution", "context_length", "vocab_size")
OPENAI_LAYOUT = ("OpenAI CLIP state dict (TorchScript archive or plain): visual.* (conv1.weight, "
                 "class_embedding, transformer.resblocks.N.*, proj | layer1..4, attnpool.*), "
                 "token_embedding.weight, positional_embedding, transformer.resblocks.N.*, "
                 "ln_final.*, text_projection, logit_scale")
KINETICS_LABELS = Path(__file__).resolve().parent.parent / "i3d" / "labels" / "kinetics400.txt"
#: the reference tool's zero-shot prompt
PROMPT = "a photo of {}"


def open_clip_module() -> Any:
    """open_clip, or a ConfigError naming the pip package."""
    return require("open_clip", "feature_type=clip", pip="open_clip_torch")


def offline() -> bool:
    return os.environ.get("VIDEO_FEATURES_OFFLINE", "") in ("1", "true", "yes")


def _openai_recipe(arch: str) -> ImageRecipe:
    size = open_clip_module().get_model_config(arch)["vision_cfg"]["image_size"]
    return recipe_from_cfg({"size": size})


for _name, (_sha, _file, _arch) in OPENAI_MODELS.items():
    register_card(WeightCard(
        name=f"clip_openai_{_arch}",
        url=f"{_OPENAI_BASE}/{_sha}/{_file}",
        sha256=_sha,
        filename=f"clip-openai-{_file}",
        layout=OPENAI_LAYOUT,
        preprocessing="RGB frame, PIL-exact bicubic resize of the shorter side to the input size, "
                      "centre crop, /255, CLIP mean (0.48145466, 0.4578275, 0.40821073) / std "
                      "(0.26862954, 0.26130258, 0.27577711)",
        extra={"model_name": _name, "open_clip_arch": _arch},
    ))


def openai_card(model_name: str) -> WeightCard:
    return get_card(f"clip_openai_{OPENAI_MODELS[model_name][2]}")


@dataclass(frozen=True)
class Source:
    """What a config asks for: the open_clip architecture, where its weights come from."""

    arch: str                  # open_clip architecture name (ViT-B-32, RN50x4, ViT-B-16-SigLIP)
    tag: str                   # "openai" or an open_clip pretrained tag
    openai_name: str | None    # OpenAI's name of the model when tag == "openai"
    card: WeightCard

    @property
    def is_openai(self) -> bool:
        return self.openai_name is not None

    def tag_cfg(self) -> dict:
        return {} if self.is_openai else dict(open_clip_module().get_pretrained_cfg(self.arch,
                                                                                    self.tag))

    def recipe(self) -> ImageRecipe:
        if self.is_openai:
            return _openai_recipe(self.arch)
        size = open_clip_module().get_model_config(self.arch)["vision_cfg"]["image_size"]
        return recipe_from_cfg({**self.tag_cfg(), "size": size})


def source_for(cfg: Mapping[str, Any]) -> Source:
    """``model_name`` + ``pretrained`` -> :class:`Source`; ConfigError naming the option."""
    open_clip = open_clip_module()
    name, tag = str(cfg["model_name"]), str(cfg.get("pretrained") or "openai")
    if tag == "openai":
        openai_name = name if name in OPENAI_MODELS else _OPENAI_ALIASES.get(name)
        if openai_name is None:
            raise ConfigError(
                f"option model_name: {name!r} is not an OpenAI CLIP model ({', '.join(OPENAI_NAMES)}); "
                "for open_clip models give their pretrained tag, e.g. model_name=ViT-B-32 "
                "pretrained=laion2b_s34b_b79k")
        return Source(OPENAI_MODELS[openai_name][2], "openai", openai_name, openai_card(openai_name))
    arch = name.replace("/", "-")
    if arch not in open_clip.list_models():
        raise ConfigError(f"option model_name: {name!r} is not an open_clip architecture (see "
                          "open_clip.list_models(), e.g. ViT-B-32, ViT-B-16-SigLIP, ViT-B-16-SigLIP2)")
    tags = open_clip.list_pretrained_tags_by_model(arch)
    if not open_clip.get_pretrained_cfg(arch, tag):
        raise ConfigError(f"option pretrained: {tag!r} is not an open_clip tag of {arch} "
                          f"(known: {', '.join(tags) or 'none'})")
    return Source(arch, tag, None, _open_clip_card(arch, tag))


def _hub_parts(tag_cfg: Mapping[str, Any]) -> tuple[str, list[str]]:
    """open_clip's ``hf_hub`` entry -> (repo id, file names to try, safetensors first)."""
    from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME

    # 'org/repo/' (trailing slash): open_clip's default file names; 'org/repo/file': that file
    repo, filename = os.path.split(tag_cfg["hf_hub"])
    if not filename:
        return repo, [HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME]
    names = [filename]
    if filename.endswith((".bin", ".pth")):
        names.insert(0, filename[:-4] + ".safetensors")
    return repo, names


def _open_clip_card(arch: str, tag: str) -> WeightCard:
    from open_clip.constants import HF_WEIGHTS_NAME

    tag_cfg = open_clip_module().get_pretrained_cfg(arch, tag)
    size = open_clip_module().get_model_config(arch)["vision_cfg"]["image_size"]
    recipe = recipe_from_cfg({**tag_cfg, "size": size})
    if tag_cfg.get("hf_hub"):
        repo, names = _hub_parts(tag_cfg)
        url, filename = f"https://huggingface.co/{repo}", names[-1]
    else:
        url = tag_cfg.get("url", "")
        filename = os.path.basename(url) or HF_WEIGHTS_NAME
    return register_card(WeightCard(
        name=f"open_clip_{arch}_{tag}", url=url, sha256="", filename=filename,
        layout="open_clip state dict (visual.*, text.* or transformer.*, logit_scale[, logit_bias])",
        preprocessing=recipe.describe(), extra={"model_name": arch, "pretrained": tag}))


def _hf_file(arch: str, tag: str, tag_cfg: Mapping[str, Any]) -> Path:
    """The checkpoint of an open_clip tag from the Hugging Face hub cache (downloaded there when
    online); WeightsError naming what to fetch otherwise. The cache is the one timm and the
    transformers-layout families use (HF_HUB_CACHE / HF_HOME read when called)."""
    repo, names = _hub_parts(tag_cfg)
    cache = hub_cache_dir()
    hf_hub_download = require("huggingface_hub", f"open_clip {arch}/{tag}").hf_hub_download
    reasons = []
    for local_only in ((True,) if offline() else (True, False)):
        for filename in names:
            try:
                return Path(hf_hub_download(repo, filename, local_files_only=local_only,
                                            cache_dir=cache, library_name="open_clip"))
            except Exception as exc:  # missing file, no network: every kind ends in the advice
                reasons.append(f"{filename}: {type(exc).__name__}")
    why = "downloads are disabled" if offline() else "; ".join(reasons[-len(names):])
    raise WeightsError(
        f"weights for open_clip {arch} pretrained={tag} are not in the Hugging Face hub cache "
        f"{cache} and could not be downloaded ({why}); fetch {names[0]} (or {names[-1]}) of "
        f"https://huggingface.co/{repo}, e.g. `hf download {repo} {names[0]} --cache-dir "
        f"{cache}`, or pass checkpoint_path=FILE")


def _url_file(arch: str, tag: str, url: str) -> Path:
    """Checkpoints open_clip publishes only by URL: open_clip's own cache (~/.cache/clip)."""
    target = Path("~/.cache/clip").expanduser() / os.path.basename(url)
    if target.is_file():
        return target
    if not offline():
        try:
            from open_clip.pretrained import download_pretrained_from_url

            return Path(download_pretrained_from_url(url))
        except Exception as exc:
            why = f"{type(exc).__name__}: {exc}"
    else:
        why = "downloads are disabled"
    raise WeightsError(f"weights for open_clip {arch} pretrained={tag} are missing and could not "
                       f"be downloaded ({why}); fetch {url} and put it at {target} (or pass "
                       "checkpoint_path=FILE)")


@lru_cache(maxsize=16)
def _digest_matches(path: str, size: int, mtime_ns: int, sha256: str) -> bool:
    return sha256_of(path) == sha256


def _openai_cache_file(card: WeightCard) -> Path | None:
    """A file OpenAI's or open_clip's own loader downloaded (``~/.cache/clip``), used when its
    sha256 is the published one and the torch hub cache has none."""
    from video_features.utils.weights import cache_dir

    if (cache_dir() / card.filename).is_file():
        return None
    p = Path("~/.cache/clip").expanduser() / os.path.basename(card.url)
    if not p.is_file():
        return None
    st = p.stat()
    if _digest_matches(str(p), st.st_size, st.st_mtime_ns, card.sha256):
        return p
    log.warning("%s: %s has another sha256 than %s; not using it", card.name, p, card.url)
    return None


def checkpoint_for(cfg: Mapping[str, Any], source: Source) -> str | None:
    """The explicit file to load for ``cfg`` (checkpoint_path, a hub-cache file of an open_clip
    tag, or OpenAI's own download cache), or None: the card's torch hub cache path / download.
    Raises WeightsError when an open_clip tag's file cannot be had."""
    if cfg.get("checkpoint_path"):
        return str(cfg["checkpoint_path"])
    if cfg.get("allow_random_weights"):
        return None
    if source.is_openai:
        found = _openai_cache_file(source.card)
        return str(found) if found else None
    tag_cfg = source.tag_cfg()
    if tag_cfg.get("file"):
        return str(tag_cfg["file"])
    if tag_cfg.get("hf_hub"):
        return str(_hf_file(source.arch, source.tag, tag_cfg))
    return str(_url_file(source.arch, source.tag, tag_cfg.get("url", "")))


def read_openai_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """OpenAI-layout weights from a TorchScript archive (the released files) or a plain state
    dict (fp16 or fp32; ``{'state_dict': ...}`` and ``module.`` prefixes accepted), as fp32."""
    try:
        state = dict(torch.jit.load(str(path), map_location="cpu").state_dict())
    except RuntimeError:  # not a TorchScript archive
        state = load_state_dict(path)
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    for key in _ARCHIVE_EXTRAS:
        state.pop(key, None)
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}


def build_network(source: Source, precision: str = "fp32") -> nn.Module:
    """Untrained open_clip model of ``source`` (fp32, CPU), with the tag's preprocessing."""
    open_clip = open_clip_module()
    tag_cfg = source.tag_cfg()
    force_pp = {k: tag_cfg[k] for k in ("mean", "std", "interpolation", "resize_mode",
                                        "fill_color") if k in tag_cfg}
    return open_clip.create_model(
        source.arch, pretrained=None, precision="fp32", device="cpu",
        force_quick_gelu=source.is_openai or bool(tag_cfg.get("quick_gelu", False)),
        force_preprocess_cfg=force_pp or None, pretrained_text=False).eval()


def load_clip(source: Source, checkpoint: str | None, random: bool) -> nn.Module:
    """The whole CLIP model (image and text towers) on the CPU in fp32, eval mode."""
    model = build_network(source)
    if random:
        return model
    if source.is_openai:
        path = resolve_checkpoint(source.card, checkpoint)
        state = read_openai_state_dict(path)
        expected = model.state_dict()
        for key, value in expected.items():   # BatchNorm counters, unused at inference
            if key.endswith("num_batches_tracked") and key not in state:
                state[key] = value
        check_keys(state, expected, f"{source.card.name} ({path}; model_name={source.openai_name})")
        model.load_state_dict(state, strict=True)
        return model
    path = resolve_checkpoint(source.card, checkpoint)
    from open_clip import load_checkpoint

    try:
        load_checkpoint(model, str(path), strict=True)
    except Exception as exc:
        raise WeightsError(f"{source.card.name}: cannot load {path}: "
                           f"{str(exc).splitlines()[0][:300]}") from exc
    return model


def kinetics_prompts() -> tuple[list[str], list[str]]:
    """(class names, prompts) of the zero-shot Kinetics-400 classifier (reference: "a photo of
    {class}")."""
    names = [ln.strip() for ln in KINETICS_LABELS.read_text().splitlines() if ln.strip()]
    return names, [PROMPT.format(n) for n in names]


# -- test and benchmark helpers ----------------------------------------------------------------
class _Holder(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def _torchscript_with(state: Mapping[str, torch.Tensor]) -> torch.jit.ScriptModule:
    """A TorchScript module whose ``state_dict()`` has exactly ``state``'s keys (as OpenAI's
    archives: their traced modules carry the weights under these names)."""
    root = _Holder()
    for key, value in state.items():
        *parents, leaf = key.split(".")
        mod = root
        for part in parents:
            if part not in mod._modules:
                mod.add_module(part, _Holder())
            mod = mod._modules[part]
        mod.register_buffer(leaf, value.detach().clone())
    return torch.jit.script(root)


def random_openai_state_dict(model_name: str, seed: int = 0,
                             dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """Random weights in OpenAI's exact layout for ``model_name`` (seeded)."""
    torch.manual_seed(seed)
    source = Source(OPENAI_MODELS[model_name][2], "openai", model_name, openai_card(model_name))
    state = build_network(source).state_dict()
    return {k: (v.to(dtype) if v.is_floating_point() else v).clone() for k, v in state.items()}


def write_random_openai_checkpoint(path: str | os.PathLike, model_name: str, seed: int = 0,
                                   dtype: torch.dtype = torch.float16,
                                   torchscript: bool = False) -> Path:
    """Write :func:`random_openai_state_dict` as a plain state dict or, with ``torchscript``,
    as a TorchScript archive that also stores the input resolution, context length and
    vocabulary size, as OpenAI's released files do."""
    state = random_openai_state_dict(model_name, seed, dtype)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if torchscript:
        extras = {"input_resolution": torch.tensor(_openai_recipe(OPENAI_MODELS[model_name][2]).size[0]),
                  "context_length": torch.tensor(state["positional_embedding"].shape[0]),
                  "vocab_size": torch.tensor(state["token_embedding.weight"].shape[0])}
        torch.jit.save(_torchscript_with({**state, **extras}), str(path))
    else:
        torch.save(state, path)
    return path


__all__ = ["OPENAI_MODELS", "OPENAI_NAMES", "PROMPT", "Source", "checkpoint_for", "kinetics_prompts",
           "load_clip", "open_clip_module", "openai_card", "random_openai_state_dict",
           "read_openai_state_dict", "source_for", "write_random_openai_checkpoint"]
