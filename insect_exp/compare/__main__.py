"""`python -m insect_exp.compare A B [key=value ...]`: see insect_exp/compare/__init__.py."""

from __future__ import annotations

import re
import sys

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig

from insect_exp import UserError
from insect_exp.config import CompareConfig, register_configs, to_object
from insect_exp.errors import exit_with
from insect_exp.predict import CONFIG_DIR

register_configs()  # the dataset schemas the dataset/*.yaml files extend
ConfigStore.instance().store(name="compare_schema", node=CompareConfig)

# A URI or a bare run id (never a flag's value such as `--cfg job`).
_POSITIONAL = re.compile(r"(runs:/|models:/)[^=]*|[0-9a-f]{32}(#.*)?")
_SIDE = re.compile(r"(baseline|candidate)=(?!['\"])(.+)")


def hydra_arguments(argv: list[str]) -> list[str]:
    """`A B` as baseline=A candidate=B, and both quoted: a URI's `#`, `@` or `:` are not all
    characters Hydra's override grammar takes unquoted."""
    positional = iter(("baseline", "candidate"))
    out = []
    for arg in argv:
        if _POSITIONAL.fullmatch(arg):
            key = next(positional, None)
            arg = f"{key}={arg}" if key else arg
        found = _SIDE.fullmatch(arg)
        if found:
            value = found.group(2).replace("\\", "\\\\").replace("'", "\\'")
            arg = f"{found.group(1)}='{value}'"
        out.append(arg)
    return out


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="compare")
def _hydra_main(dict_cfg: DictConfig) -> None:
    from insect_exp import compare

    try:
        cfg = to_object(dict_cfg, CompareConfig)  # typed, ranges checked: before TensorFlow loads
        outcome = compare.run(cfg)
    except UserError as err:
        exit_with("insect_exp.compare", f"error: {err}", 2)
    except KeyboardInterrupt:
        exit_with("insect_exp.compare", "interrupted", 130)
    if outcome.failures:
        sys.exit(1)


def main() -> None:
    sys.argv[1:] = hydra_arguments(sys.argv[1:])
    _hydra_main()


if __name__ == "__main__":
    main()
