"""Command line: `python -m insect_exp [overrides]` or `insect-exp [overrides]`."""

import gc
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from insect_exp import UserError
from insect_exp.config import register_configs

# conf/ sits beside the package in the repository (an editable install, as README sets up); an
# absolute path works both for `python -m insect_exp` and for the console script.
CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "conf")

register_configs()


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")
def _hydra_main(cfg: DictConfig) -> float:
    try:
        missing = sorted(OmegaConf.missing_keys(cfg))
        if missing:
            raise UserError(f"no value for {', '.join(missing)}: set it on the command line")
        # Imported here so that --help, --cfg and config errors never pay for TensorFlow.
        from insect_exp import train

        return train.run(cfg)
    except UserError as err:
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            raise  # the sweep records the failed job and goes on
        print(f"insect_exp: error: {err}", file=sys.stderr)
        sys.exit(2)


def main() -> None:
    """Console-script entry point (same as `python -m insect_exp`)."""
    _hydra_main()
    # The process ends next: spare its final garbage collections over TensorFlow's many objects
    # (2-3 s per run, measured on hub runs); nothing is left to free that the OS will not.
    gc.freeze()


if __name__ == "__main__":
    main()
