"""Which timm model and checkpoint a config names, and how they are loaded.

``model_name`` is a timm name with or without its pretrained tag
(``vit_base_patch16_224.augreg_in21k``, ``convnext_base`` = its default tag); timm's pretrained
config of that tag gives the eval preprocessing, the number of classes and where the weights
live. Resolution: ``checkpoint_path`` (timm's state dict of that model, safetensors or torch
file) -> the Hugging Face hub cache file timm itself downloads (``<hf_hub_id>``'s
``model.safetensors``, else ``pytorch_model.bin``) -> a download into that cache unless offline
-> a one-line :class:`WeightsError` naming the ``hf download`` command and the cache folder. The
few tags published only by URL use the torch hub cache, as timm does.

The file is then loaded by timm itself (``create_model(pretrained=True)`` with the file as its
pretrained source): timm's checkpoint reader, its model's filter function and a strict load, the
same code as a plain ``timm.create_model(name, pretrained=True)``. timm is imported only here
and in the extractor.
"""
from __future__ import annotations

import difflib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from torch import nn

from video_features.models.timm_image.preprocess import TimmRecipe, recipe_from_data_config
from video_features.utils.errors import ConfigError, WeightsError, require
from video_features.utils.hf_hub import hub_cache_dir, offline
from video_features.utils.weights import WeightCard, register_card, resolve_checkpoint

log = logging.getLogger(__name__)

#: what timm's load_state_dict_from_hf reads from a hub repo, in its order of preference
HUB_FILES = ("model.safetensors", "pytorch_model.bin")
LAYOUT = ("timm state dict of the model (the keys of timm.create_model(model_name).state_dict(), "
          "e.g. patch_embed.proj.weight, blocks.N.attn.qkv.weight, head.weight; safetensors or "
          "torch file)")


def import_timm() -> Any:
    """timm, or a ConfigError naming the pip package."""
    return require("timm", "feature_type=timm")


@dataclass(frozen=True)
class Source:
    """One timm model with its pretrained config (the tag's)."""

    name: str                  # architecture.tag, as timm resolves model_name
    arch: str
    pretrained_cfg: Mapping[str, Any]

    @property
    def hub_repo(self) -> tuple[str, str | None] | None:
        """(repo id, revision) of the tag's Hugging Face repo, or None."""
        hub = self.pretrained_cfg.get("hf_hub_id")
        if not hub:
            return None
        repo, _, rev = str(hub).partition("@")
        return repo, rev or None

    @property
    def url(self) -> str:
        return str(self.pretrained_cfg.get("url") or "")

    @property
    def num_classes(self) -> int:
        return int(self.pretrained_cfg.get("num_classes") or 0)

    def data_config(self) -> dict:
        """timm's resolve_data_config on the tag's pretrained config (what
        resolve_model_data_config gives for the model built from it)."""
        return dict(import_timm().data.resolve_data_config(pretrained_cfg=dict(self.pretrained_cfg)))


def source_for(model_name: str) -> Source:
    """``model_name`` -> :class:`Source`; ConfigError naming the option when timm does not know
    the architecture or the tag."""
    timm = import_timm()
    from timm.models import get_pretrained_cfg, split_model_name_tag

    name = str(model_name or "").strip()
    arch, tag = split_model_name_tag(name)
    if not name or not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=3, cutoff=0.75)
        hint = f" (close: {', '.join(close)})" if close else ""
        raise ConfigError(f"option model_name: {name!r} is not a timm model{hint}; see "
                          "timm.list_models('vit_*') for architectures and "
                          "timm.list_pretrained('vit_*') for architecture.tag names")
    try:
        cfg = get_pretrained_cfg(name)
    except RuntimeError:      # timm: "Invalid pretrained tag (...) for ..."
        cfg = None
    if cfg is None:
        tags = timm.list_pretrained(f"{arch}.*")
        raise ConfigError(f"option model_name: {tag!r} is not a pretrained tag of timm's {arch} "
                          f"(known: {', '.join(t.split('.', 1)[1] for t in tags[:12]) or 'none'}"
                          f"{', ...' if len(tags) > 12 else ''}; see timm.list_pretrained)")
    full = f"{arch}.{cfg.tag}" if cfg.tag else arch
    return Source(full, arch, cfg.to_dict())


def recipe_for(source: Source, data: Mapping[str, Any] | None = None,
               crop_pct: float | None = None, crop_mode: str | None = None) -> TimmRecipe:
    """The eval preprocessing of ``source`` from timm's data config ``data`` (default: the one
    of its pretrained config), ``crop_pct`` / ``crop_mode`` replaced where given; ConfigError for
    what cannot be matched exactly."""
    data = dict(source.data_config() if data is None else data)
    if crop_pct is not None:
        data["crop_pct"] = crop_pct
    if crop_mode is not None:
        data["crop_mode"] = crop_mode
    try:
        return recipe_from_data_config(data)
    except ValueError as exc:
        raise ConfigError(f"model_name {source.name}: its preprocessing is not supported: "
                          f"{exc}") from None


def card_for(source: Source) -> WeightCard:
    """The card of the tag's published weights; the record beside each output adds the sha256
    of the file actually loaded (the hub checks its own downloads)."""
    repo = source.hub_repo
    if repo:
        url = f"https://huggingface.co/{repo[0]}" + (f"/tree/{repo[1]}" if repo[1] else "")
        filename = " or ".join(HUB_FILES) + f" of {repo[0]} (Hugging Face hub cache)"
    else:
        url, filename = source.url, os.path.basename(source.url) or "(none published)"
    cfg = source.pretrained_cfg
    return register_card(WeightCard(
        name=f"timm:{source.name}", url=url, sha256="", filename=filename, layout=LAYOUT,
        preprocessing=recipe_for(source).describe(), num_classes=source.num_classes or None,
        extra={"model_name": source.name, "license": cfg.get("license") or ""}))


def _hub_file(source: Source) -> Path:
    """The tag's weights from the Hugging Face hub cache, downloaded there unless offline."""
    repo, revision = source.hub_repo
    names = [source.pretrained_cfg["hf_hub_filename"]] if source.pretrained_cfg.get(
        "hf_hub_filename") else list(HUB_FILES)
    cache = hub_cache_dir()
    hf_hub_download = require("huggingface_hub", "feature_type=timm").hf_hub_download
    for filename in names:
        try:
            return Path(hf_hub_download(repo, filename, revision=revision, cache_dir=cache,
                                        local_files_only=True))
        except Exception:      # not cached: try the next name, then the network
            pass
    why = "downloads are disabled (VIDEO_FEATURES_OFFLINE / HF_HUB_OFFLINE)"
    if not offline():
        from huggingface_hub import errors

        # a file missing from the repo (LocalEntryNotFoundError, no network, is not one)
        missing = getattr(errors, "RemoteEntryNotFoundError", errors.EntryNotFoundError)
        for filename in names:
            try:
                return Path(hf_hub_download(repo, filename, revision=revision, cache_dir=cache,
                                            library_name="timm"))
            except missing:              # the repo has the other file name (timm's order)
                why = f"{repo} has none of {', '.join(names)}"
            except Exception as exc:     # no network, unknown or gated repo: the same advice
                text = " ".join(str(exc).split())[:120]
                why = f"the download failed ({type(exc).__name__}{': ' + text if text else ''})"
                break
    rev = f" --revision {revision}" if revision else ""
    raise WeightsError(
        f"timm {source.name}: weights are not in the Hugging Face hub cache {cache} and {why}; "
        f"fetch them where there is network with `hf download {repo} {names[0]}{rev} "
        f"--cache-dir {cache}`, or pass checkpoint_path=FILE (timm's state dict of {source.name})")


def weights_file(cfg: Mapping[str, Any], source: Source) -> str | None:
    """The file ``cfg`` loads (checkpoint_path, the hub cache's, the torch hub cache's for
    URL-only tags), or None for random weights; WeightsError when it cannot be had."""
    if cfg.get("checkpoint_path"):
        p = Path(cfg["checkpoint_path"]).expanduser()
        if not p.is_file():
            raise WeightsError(f"checkpoint_path {cfg['checkpoint_path']!r} for timm "
                               f"{source.name} does not exist")
        return str(p)
    if cfg.get("allow_random_weights"):
        return None     # the rule of use_random_weights, without its log line (logged at load)
    if source.hub_repo:
        return str(_hub_file(source))
    if source.url:      # timm's url path: torch.hub's checkpoint folder, file named as the URL
        return str(resolve_checkpoint(card_for(source)))
    raise WeightsError(f"timm publishes no weights for {source.name}; pass checkpoint_path=FILE "
                       "or allow_random_weights=true (benchmarks only)")


def build_model(source: Source, path: str | None, timm_layout: bool = True) -> nn.Module:
    """The timm model of ``source`` (CPU, fp32, eval): random weights when ``path`` is None,
    else ``path`` loaded by timm (strictly; ``timm_layout``: a timm state dict, not the original
    release format that some tags' own loaders convert)."""
    timm = import_timm()
    if path is None:
        return timm.create_model(source.name, pretrained=False).eval()
    overlay: dict[str, Any] = {"file": str(path)}
    if timm_layout:       # hub files are timm state dicts, even where the URL is a .npz
        overlay["custom_load"] = False
    try:
        model = timm.create_model(source.name, pretrained=True, pretrained_cfg_overlay=overlay)
    except Exception as exc:   # a file of another model, a broken file: one line
        text = " ".join(str(exc).split())
        raise WeightsError(f"timm {source.name}: cannot load {path} ({type(exc).__name__}: "
                           f"{text[:300]}{'...' if len(text) > 300 else ''})") from None
    return model.eval()


def class_names(model: nn.Module) -> list[str]:
    """Names of the classifier's outputs: the pretrained config's label names where it has
    them, else the ImageNet subset timm infers from the number of classes, else indices."""
    timm = import_timm()
    n = int(getattr(model, "num_classes", 0) or 0)
    cfg = dict(getattr(model, "pretrained_cfg", {}) or {})
    names = list(cfg.get("label_names") or [])
    if len(names) == n and n:
        desc = cfg.get("label_descriptions") or {}
        return [str(desc.get(k, k)) for k in names]
    subset = timm.data.infer_imagenet_subset(model)
    if subset:
        descriptions = timm.data.ImageNetInfo(subset).label_descriptions()
        if len(descriptions) == n:
            return list(descriptions)
    return [str(i) for i in range(n)]


def write_random_hub_weights(model_name: str, cache: str | os.PathLike | None = None,
                             seed: int = 0, noise: float = 0.05) -> Path:
    """Random weights of ``model_name`` as the hub publishes them (timm's state dict as
    ``model.safetensors`` of the tag's repo), placed in the hub cache's layout (refs/main ->
    snapshots/<commit>/), so that they load through the real code path. ``noise`` moves every
    tensor off its initial value (LayerNorm ones and zeros would hide mistakes). For tests and
    benchmarks only."""
    import hashlib

    import torch
    from safetensors.torch import save_file

    source = source_for(model_name)
    repo, _ = source.hub_repo or (None, None)
    if repo is None:
        raise WeightsError(f"timm {source.name} has no Hugging Face repo")
    torch.manual_seed(seed)
    model = import_timm().create_model(source.name, pretrained=False)
    with torch.no_grad():
        for t in model.state_dict().values():
            if t.is_floating_point():
                t.add_(noise * torch.randn_like(t))
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    commit = hashlib.sha1(f"{source.name}:{seed}".encode()).hexdigest()
    root = Path(cache or hub_cache_dir()) / ("models--" + repo.replace("/", "--"))
    snap = root / "snapshots" / commit
    snap.mkdir(parents=True, exist_ok=True)
    save_file(state, str(snap / HUB_FILES[0]), metadata={"format": "pt"})
    (root / "refs").mkdir(exist_ok=True)
    (root / "refs" / "main").write_text(commit)
    return snap / HUB_FILES[0]
