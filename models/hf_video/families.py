"""What differs between transformers' video models: the network class to build, its input, its
frames per clip, and the poolings of its tokens into one vector per clip.

Poolings (the ``pooling`` option; ``auto`` takes the first one a network has, which is the one its
model card or classification head uses):

- ``cls``: the class token of the final hidden state (TimeSformer, ViViT: their classifiers' input).
- ``mean``: the mean of the final hidden state's patch tokens (V-JEPA 2's encoder output, as its
  model card pools it; VideoMAE's self-supervised encoders).
- ``fc_norm``: VideoMAE's fine-tuned heads: the token mean through ``fc_norm`` (the classifier's
  input).
- ``attentive``: V-JEPA 2's attentive pooler (checkpoints with a classification head, where it is
  the default).
- ``mit``: X-CLIP's video embedding: every frame's projected class token through its
  multi-frame integration transformer (``get_video_features``); X-CLIP's ``mean`` averages the
  projected frame embeddings instead.
- ``pooler``: the network's own ``pooler_output`` (models run from their repo's code, and other
  transformers encoders), else the token mean.
"""
from __future__ import annotations

import inspect
from typing import Any, Callable

import torch

POOLINGS = ("auto", "cls", "mean", "fc_norm", "attentive", "mit", "pooler")


class Family:
    """A model type's handling; the base class covers models whose code comes from their repo
    (``trust_remote_code``) and other transformers video encoders: ``model(**processor output)``,
    pooled from ``pooler_output`` or the final hidden state."""

    model_type = ""
    #: (base model, video classification model) class names in transformers
    classes: tuple[str, str | None] = ("", None)
    #: the attribute of the classification model that holds the base model
    base_attr = ""
    input_name = "pixel_values"
    poolings: tuple[str, ...] = ("pooler", "cls", "mean")
    #: the position embeddings fit only the config's frames per clip
    fixed_frames = False

    def network_class(self, tf: Any, config: Any) -> Any:
        """The classification model when the checkpoint is one (its head pools and predicts),
        else the base model."""
        base, classify = self.classes
        if classify and classify in (getattr(config, "architectures", None) or []):
            return getattr(tf, classify)
        return getattr(tf, base)

    def frames(self, config: Any, processor: Any) -> int | None:
        for source, attr in ((config, "num_frames"), (config, "frames_per_clip"),
                             (processor, "num_frames")):
            value = getattr(source, attr, None)
            if isinstance(value, int) and value > 0:
                return value
        return None

    def image_size(self, config: Any) -> tuple[int, int] | None:
        size = getattr(config, "image_size", None) or getattr(config, "crop_size", None)
        if isinstance(size, int):
            return size, size
        if isinstance(size, (list, tuple)) and len(size) == 2:
            return int(size[0]), int(size[1])
        return None

    def is_classifier(self, net: Any) -> bool:
        return self.classes[1] is not None and type(net).__name__ == self.classes[1]

    def base(self, net: Any) -> Any:
        return getattr(net, self.base_attr) if self.is_classifier(net) else net

    def available(self, net: Any) -> tuple[str, ...]:
        """The poolings this network has, the default first."""
        return self.poolings

    def encode(self, net: Any, batch: torch.Tensor) -> Any:
        return self.base(net)(**{self.input_name: batch})

    def features(self, net: Any, batch: torch.Tensor, pooling: str) -> torch.Tensor:
        """(B, T, C, H, W) clips -> (B, D)."""
        hidden = self.encode(net, batch).last_hidden_state
        if pooling == "cls":
            return hidden[:, 0]
        return hidden[:, 1:].mean(1)   # patch tokens (after the class token)

    def head(self, net: Any, pooling: str) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """Pooled features -> class logits, where the network has a classifier that takes
        exactly these features (``show_pred``)."""
        return None


class Generic(Family):
    def __init__(self, net: Any):
        params = inspect.signature(net.forward).parameters
        self.input_name = "pixel_values_videos" if "pixel_values_videos" in params \
            else "pixel_values"

    def network_class(self, tf: Any, config: Any) -> Any:
        return tf.AutoModel

    def available(self, net: Any) -> tuple[str, ...]:
        return ("pooler", "cls", "mean")

    def encode(self, net: Any, batch: torch.Tensor) -> Any:
        return net(**{self.input_name: batch})

    def features(self, net: Any, batch: torch.Tensor, pooling: str) -> torch.Tensor:
        out = self.encode(net, batch)
        if isinstance(out, torch.Tensor):
            return out if out.dim() == 2 else out.flatten(1, -2).mean(1)
        if pooling == "pooler":
            pooled = getattr(out, "pooler_output", None)
            if pooled is not None:
                return pooled.flatten(1)
            return out.last_hidden_state.mean(1)
        return super().features(net, batch, pooling)


class VideoMAE(Family):
    model_type = "videomae"
    classes = ("VideoMAEModel", "VideoMAEForVideoClassification")
    base_attr = "videomae"
    poolings = ("fc_norm", "mean")
    fixed_frames = True

    def available(self, net: Any) -> tuple[str, ...]:
        if self.is_classifier(net) and net.fc_norm is not None:
            return ("fc_norm", "mean")
        return ("mean",)

    def features(self, net: Any, batch: torch.Tensor, pooling: str) -> torch.Tensor:
        pooled = self.encode(net, batch).last_hidden_state.mean(1)   # no class token
        return net.fc_norm(pooled) if pooling == "fc_norm" else pooled

    def head(self, net: Any, pooling: str) -> Callable | None:
        if not self.is_classifier(net):
            return None
        if pooling == "fc_norm":
            return net.classifier
        if net.fc_norm is not None:
            return lambda x: net.classifier(net.fc_norm(x))
        return None


class TimeSformer(Family):
    model_type = "timesformer"
    classes = ("TimesformerModel", "TimesformerForVideoClassification")
    base_attr = "timesformer"
    poolings = ("cls", "mean")

    def head(self, net: Any, pooling: str) -> Callable | None:
        return net.classifier if self.is_classifier(net) and pooling == "cls" else None


class ViViT(TimeSformer):
    model_type = "vivit"
    classes = ("VivitModel", "VivitForVideoClassification")
    base_attr = "vivit"
    fixed_frames = True


class VJEPA2(Family):
    model_type = "vjepa2"
    classes = ("VJEPA2Model", "VJEPA2ForVideoClassification")
    base_attr = "vjepa2"
    input_name = "pixel_values_videos"
    poolings = ("mean", "attentive")

    def available(self, net: Any) -> tuple[str, ...]:
        # a classification checkpoint's pooler was trained with it: its card pools with it
        return ("attentive", "mean") if self.is_classifier(net) else ("mean",)

    def encode(self, net: Any, batch: torch.Tensor) -> Any:
        # the predictor (the self-supervised training target) takes no part in features
        return self.base(net)(pixel_values_videos=batch, skip_predictor=True)

    def features(self, net: Any, batch: torch.Tensor, pooling: str) -> torch.Tensor:
        hidden = self.encode(net, batch).last_hidden_state   # no class token
        return net.pooler(hidden) if pooling == "attentive" else hidden.mean(1)

    def head(self, net: Any, pooling: str) -> Callable | None:
        return net.classifier if self.is_classifier(net) and pooling == "attentive" else None


class XCLIP(Family):
    model_type = "xclip"
    classes = ("XCLIPModel", None)
    poolings = ("mit", "mean")
    fixed_frames = True

    def frames(self, config: Any, processor: Any) -> int | None:
        return getattr(config.vision_config, "num_frames", None)

    def image_size(self, config: Any) -> tuple[int, int] | None:
        return super().image_size(config.vision_config)

    def features(self, net: Any, batch: torch.Tensor, pooling: str) -> torch.Tensor:
        b, t = batch.shape[:2]
        frames = net.vision_model(pixel_values=batch.flatten(0, 1)).pooler_output
        per_frame = net.visual_projection(frames).view(b, t, -1)
        if pooling == "mean":
            return per_frame.mean(1)
        return net.mit(per_frame).pooler_output


FAMILIES = {f.model_type: f for f in (VideoMAE(), TimeSformer(), ViViT(), VJEPA2(), XCLIP())}


def family_for(model_type: str) -> Family | None:
    return FAMILIES.get(model_type)
