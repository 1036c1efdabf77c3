"""`replicates=N`: each configuration of a run or sweep trained N times, seeds seed..seed+N-1.

The config does it with Hydra's own keys (conf/config.yaml), so that every way of composing it
agrees: `hydra.mode` becomes MULTIRUN (no -m needed) and the basic sweeper's `hydra.sweeper.params`
gets `seed=<seed>,...,<seed+N-1>`, a seed sweep like one written on the command line. The seeds
start at the configured seed, from the defaults or an experiment preset. A `seed=` on the command
line would replace that sweep (the basic sweeper lets the command line's value of a key win), so
with replicates>1 it is refused, pointing to the sweep it meant. A sweeper with params of its own
(Optuna's search space) replaces that node: it would search the seed as a hyperparameter, so
replicates>1 is refused there (see `check`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from omegaconf import OmegaConf

from insect_exp import UserError

MODE_RESOLVER = "insect_exp.replicates_mode"
PARAMS_RESOLVER = "insect_exp.replicates_params"


def seeds(seed: int, replicates: int) -> str:
    """The seed sweep of `replicates` runs from `seed`, as an override's value: "5,6,7"."""
    return ",".join(str(int(seed) + i) for i in range(int(replicates)))


def run_mode(replicates: Any) -> str | None:
    """hydra.mode for `replicates`: MULTIRUN above 1, else Hydra's choice (-m or not)."""
    return "MULTIRUN" if int(replicates) > 1 else None


def sweeper_params(seed: Any, replicates: Any) -> dict[str, str]:
    """The basic sweeper's params for `replicates`: the seed sweep above 1, else none."""
    return {"seed": seeds(seed, replicates)} if int(replicates) > 1 else {}


def register_resolvers() -> None:
    """Make the resolvers that conf/config.yaml's hydra node uses known to OmegaConf."""
    for name, resolver in ((MODE_RESOLVER, run_mode), (PARAMS_RESOLVER, sweeper_params)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, resolver)


def check(
    replicates: int, seed: int, task: Sequence[str], sweeper_params: Mapping[str, Any]
) -> None:
    """Refuse a sweep whose seeds replicates=N cannot set.

    Args:
        replicates: the config's replicates.
        seed: the config's seed, where the replicates' seeds start.
        task: the command line's overrides.
        sweeper_params: `hydra.sweeper.params`, resolved.

    Raises:
        UserError: replicates>1 with a seed (a sweep or one value) on the command line, or with
            a sweeper whose params replace the seed sweep (Optuna's).
    """
    if replicates <= 1:
        return
    from hydra.core.override_parser.overrides_parser import OverridesParser

    for override in OverridesParser.create().parse_overrides(list(task)):
        if override.get_key_element().lstrip("+~") != "seed":
            continue
        if override.is_sweep_override():
            raise UserError(
                f"replicates={replicates} and a sweep over seed ({override.input_line}) both "
                "set the seeds: give one of them"
            )
        # Hydra's basic sweeper lets a command-line value replace its params' sweep of the key.
        first = override.get_value_element_as_str()
        raise UserError(
            f"replicates={replicates} with {override.input_line} on the command line would train "
            f"seed {first} alone (the command line's seed replaces the seed sweep): give the "
            f"seeds as a sweep instead, seed={seeds(int(first), replicates)}"
        )
    if str((sweeper_params or {}).get("seed")) != seeds(seed, replicates):
        raise UserError(
            f"replicates={replicates} needs Hydra's basic sweeper and its seed sweep in "
            "hydra.sweeper.params; this sweeper's own params replace it (Optuna would search "
            "the seed): sweep seed=... there instead"
        )
