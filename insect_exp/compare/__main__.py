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

# Hydra's flags that take a value (`--cfg job`): that value is no positional A or B.
_FLAGS_WITH_VALUES = frozenset(
    {"--cfg", "-c", "--package", "-p", "--config-path", "-cp", "--config-name", "-cn"}
    | {"--config-dir", "-cd", "--info", "-i", "--experimental-rerun"}
)
_SIDE = re.compile(r"(baseline|candidate)=(?!['\"])(.+)")


def hydra_arguments(argv: list[str]) -> list[str]:
    """`A B` as baseline=A candidate=B, and both quoted: a URI's `#`, `@` or `:` are not all
    characters Hydra's override grammar takes unquoted."""
    positional = iter(("baseline", "candidate"))
    out: list[str] = []
    for arg in argv:
        flag_value = bool(out) and out[-1] in _FLAGS_WITH_VALUES
        uri = arg.startswith(("runs:/", "models:/"))  # a group's name may hold `=`
        if uri or ("=" not in arg and not arg.startswith("-") and not flag_value):
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
        raise GateFailed(1)


class GateFailed(SystemExit):
    """The candidate failed the gate: the command's only way to exit 1."""


def main() -> None:
    sys.argv[1:] = hydra_arguments(sys.argv[1:])
    try:
        _hydra_main()
    except GateFailed:
        raise
    except SystemExit as err:
        # Hydra ends on a bad override or an error in the job with 1, which a pipeline would read
        # as a failed gate: the comparison did not happen.
        if err.code == 1:
            sys.exit(2)
        raise


if __name__ == "__main__":
    main()
