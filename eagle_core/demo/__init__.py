"""The offline demo target: tokenizer, tiny Llama and datasets built from the Python stdlib.

Entry point: `build_demo_target(store, cfg)`. Tests use `build_small_target(dir)`.
"""

from eagle_core.demo.build import (
    CODE_VERSION,
    STAGE,
    DemoTargetConfig,
    build_demo_target,
    build_small_target,
)
from eagle_core.demo.tokenizer import FIM_FAMILIES, FimTokens, build_tokenizer

__all__ = [
    "CODE_VERSION",
    "FIM_FAMILIES",
    "STAGE",
    "DemoTargetConfig",
    "FimTokens",
    "build_demo_target",
    "build_small_target",
    "build_tokenizer",
]
