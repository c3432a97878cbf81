"""The ``tvl1_*`` options, shared by every feature type that can make TV-L1 flow (i3d's flow
stream, the ``tvl1`` flow output, fine-tuning). Their defaults, OpenCV's DualTVL1 ones, are in
each one's YAML (configs/i3d.yml, tvl1.yml, finetune.yml), held equal to
:class:`models.tvl1.net.TVL1Params` by the tests."""
from __future__ import annotations

import dataclasses

from video_features.utils.config import option


@dataclasses.dataclass
class TVL1Options:
    tvl1_tau: float = option("TV-L1 time step of the dual update", above=0, changes_values=True)
    tvl1_lambda: float = option("TV-L1 weight of the data term (smaller: smoother flow)", above=0,
                                changes_values=True)
    tvl1_theta: float = option("TV-L1 coupling of the primal and auxiliary variables", above=0,
                               changes_values=True)
    tvl1_nscales: int = option("TV-L1 pyramid levels (fewer where a side would drop under 16 px)",
                               at_least=1, changes_values=True)
    tvl1_warps: int = option("TV-L1 warpings per pyramid level", at_least=1, changes_values=True)
    tvl1_epsilon: float = option("TV-L1 stopping threshold (RMS change of the flow per step)",
                                 at_least=0, changes_values=True)
    tvl1_inner_iterations: int = option("TV-L1 iterations between median filterings", at_least=1,
                                        changes_values=True)
    tvl1_outer_iterations: int = option("TV-L1 median filterings per warp", at_least=1,
                                        changes_values=True)
    tvl1_scale_step: float = option("TV-L1 size ratio of consecutive pyramid levels, in (0, 1)",
                                    above=0, changes_values=True)
    tvl1_gamma: float = option("TV-L1 weight of the illumination term (0: off)", at_least=0,
                               changes_values=True)
    tvl1_median_filtering: int = option("TV-L1 median filter size, odd (0 or 1: off)", at_least=0,
                                        changes_values=True)


def check_tvl1_options(cfg) -> None:
    """ConfigError for a combination the solver refuses (one line, naming the option)."""
    from video_features.models.tvl1.net import TVL1Params
    from video_features.utils.errors import ConfigError

    try:
        TVL1Params.from_config(cfg)
    except ValueError as exc:
        raise ConfigError(f"option {str(exc).replace('TV-L1 ', 'tvl1_', 1)}") from None
