"""Command line: `python -m insect_exp [overrides]` or `insect-exp [overrides]`."""

import gc
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from insect_exp import UserError
from insect_exp.config import register_configs, to_object

# conf/ sits beside the package in the repository (an editable install, as README sets up); an
# absolute path works both for `python -m insect_exp` and for the console script.
CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "conf")

register_configs()


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")
def _hydra_main(dict_cfg: DictConfig) -> float:
    try:
        cfg = to_object(dict_cfg)  # typed from here on; ranges checked before TensorFlow loads
        # Imported here so that --help, --cfg and config errors never pay for TensorFlow.
        from insect_exp import train

        return train.run(cfg)
    except UserError as err:
        if OmegaConf.select(dict_cfg, "runtime.job_num", default=None) is not None:
            raise  # a multirun job: the sweep records it as failed and goes on
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
