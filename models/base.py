"""The Extractor seam every feature type implements.

An extractor is built once per worker with ``(cfg, device)``; the runner then calls
:meth:`Extractor.extract` for one video at a time and writes whatever dict it returns. Bad input
is reported by raising :class:`utils.errors.VideoError` with a one-line reason.

Option validation happens in :meth:`Extractor.validate`, a classmethod the config layer calls
before any worker starts or any model is loaded.
"""
from __future__ import annotations

import abc
import dataclasses
from typing import Callable, ClassVar

import numpy as np
import torch

from utils.config import Config, SharedOptions, option
from utils.windows import TAILS
from utils.weights import WeightCard


@dataclasses.dataclass
class StackOptions(SharedOptions):
    """Options of the clip models (i3d, r21d)."""

    stack_size: int = option("frames per stack (clip); an i3d stack reads stack_size + 1 frames "
                             "(flow needs pairs)", at_least=1, changes_values=True)
    step_size: int = option("frames between the starts of consecutive stacks", at_least=1,
                            changes_values=True)
    tail: str = option("drop: ignore frames after the last full stack (reference behaviour); "
                       "pad: one more stack, completed by repeating its last frame",
                       choices=TAILS, changes_values=True)


class Extractor(abc.ABC):
    #: keys of the dict ``extract`` returns, in the order they are written; set per instance
    output_keys: tuple[str, ...] = ()
    #: ``batch_size: auto`` per device type: CPUs run convolutions fastest on small batches
    #: (cache locality), GPUs need large ones to be kept busy
    auto_batch_size: ClassVar[dict[str, int]] = {"cpu": 8, "cuda": 32}
    #: the typed schema of this feature type's options (utils/config.py)
    schema: ClassVar[type] = SharedOptions
    #: bumped whenever this feature type's numbers change for the same options and weights,
    #: so that outputs of an older revision are recomputed rather than reused
    revision: ClassVar[int] = 1

    def __init__(self, cfg: Config, device: torch.device) -> None:
        self.cfg = cfg
        self.device = torch.device(device)
        #: frames decoded for the current video; the runner reads it for frames/s
        self.frames_read = 0
        #: called with each count as frames are read (the runner's live progress), or None
        self.progress_hook: Callable[[int], None] | None = None

    @classmethod
    def validate(cls, cfg: Config) -> None:
        """Raise :class:`utils.errors.ConfigError` naming the option when ``cfg`` is invalid."""

    @abc.abstractmethod
    def extract(self, path: str) -> dict[str, np.ndarray]:
        """Features of one video (or frame folder / audio file) as numpy arrays."""

    @classmethod
    def weights_for(cls, cfg: Config) -> dict[str, tuple[WeightCard, str | None]]:
        """role -> (weight card, explicit checkpoint path or None) of every checkpoint ``cfg``
        loads; recorded beside the outputs so that other weights are never mistaken for these."""
        return {}

    @classmethod
    def output_keys_for(cls, cfg: Config) -> tuple[str, ...]:
        """Keys ``extract`` will return under ``cfg`` (used to find finished outputs up front)."""
        return tuple(cls.output_keys)

    def count_frames(self, n: int) -> None:
        self.frames_read += int(n)
        if self.progress_hook is not None:
            self.progress_hook(int(n))

    def print_predictions(self, title: str, probs: torch.Tensor, labels: list[str],
                          k: int = 5, first: int = 0) -> None:
        """``--show_pred``: top-k classes per row of ``probs`` (rows = frames or stacks)."""
        top_p, top_i = probs.float().cpu().topk(min(k, probs.shape[-1]), dim=-1)
        for row, (ps, ids) in enumerate(zip(top_p.tolist(), top_i.tolist())):
            preds = "  ".join(f"{labels[i] if i < len(labels) else i}: {p:.3f}"
                              for p, i in zip(ps, ids))
            print(f"{title} #{first + row}: {preds}", flush=True)
