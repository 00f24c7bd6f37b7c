"""Where ``scbench run`` finds its configs (the package's, then plugin folders'), and the checks run on its
command-line overrides before Hydra starts: unknown group choices, keys and method knobs, each with a suggestion."""
from __future__ import annotations

from pathlib import Path

GROUPS = ("model", "method", "task", "mode", "sweep", "engine")


def store_dir(*, _root_) -> str:
    """The folder of the config's ``store`` (Hydra writes its logs there), read from the raw value so that a store
    interpolating a job's number (``store=results/x_${hydra:job.num}.sqlite``) still names its folder before any job
    runs; ``results`` when even the folder is not known yet."""
    node = _root_._get_node("store")
    raw = str(node._value()) if node is not None else "results/scbench.sqlite"
    parent = str(Path(raw).parent)
    if "${" not in parent:
        return parent
    try:
        return str(Path(str(_root_.store)).parent)
    except Exception:  # noqa: BLE001 - an interpolation only a job can resolve
        return "results"


def _register_resolvers() -> None:
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("scbench_store_dir"):  # hydra.run.dir / sweep.dir: Hydra's logs next to the store
        OmegaConf.register_new_resolver("scbench_store_dir", store_dir)


def config_dir() -> Path:
    import scbench.configs

    _register_resolvers()
    return Path(scbench.configs.__file__).resolve().parent


def config_roots() -> list[Path]:
    """The package's configs, then every plugin folder's ``configs/``."""
    from scbench.plugins import config_dirs

    return [config_dir(), *config_dirs()]


def config_file(group: str, choice: str) -> Path:
    for root in config_roots():
        if (root / group / f"{choice}.yaml").exists():
            return root / group / f"{choice}.yaml"
    raise FileNotFoundError(f"no config {group}/{choice}.yaml")


def group_choices(group: str) -> list[str]:
    return sorted({p.stem for root in config_roots() for p in (root / group).glob("*.yaml")})


def _root_defaults() -> dict:
    from omegaconf import OmegaConf

    c = OmegaConf.to_container(OmegaConf.load(config_dir() / "config.yaml"), resolve=False)
    c.pop("hydra", None)
    c.pop("defaults", None)
    return c


def check_overrides(args: list[str]) -> None:
    """Refuse, before Hydra starts, ``task=nope`` (or any unknown group choice, also inside sweep lists),
    an unknown top-level or ``data.``/``policy.`` key and a method knob the chosen method(s) do not have,
    each with a suggestion."""
    from scbench.registry import UnknownName, suggest
    from scbench.validate import SpecError, did_you_mean

    defaults = _root_defaults()
    methods = ["full"]
    for arg in args:
        key, sep, value = arg.partition("=")
        key = key.lstrip("+~")
        if key == "method" and sep:
            methods = [m for m in value.split(",") if m]
        elif key == "sweep" and sep:
            methods = []  # the preset picks them: checked when each job's spec is validated
        if not sep or key not in GROUPS:
            continue
        valid = group_choices(key)
        for choice in value.split(","):
            if choice and choice not in valid:
                raise UnknownName(suggest(choice, valid, key))
    for arg in args:
        key, sep, _ = arg.partition("=")
        bare = key.lstrip("+~")
        if arg.startswith("-") or not sep or bare.startswith("hydra"):
            continue
        head, _, rest = bare.partition(".")
        if head == "method":
            for m in methods if rest else ():
                _check_knob(m, rest.split(".")[0])
            continue
        if head in GROUPS or key.startswith("+"):  # model/task/engine keys are free-form; +key adds one on purpose
            continue
        if head not in defaults:
            raise SpecError(f"unknown key {head!r}", f"{did_you_mean(head, [*defaults, *GROUPS])}keys: "
                            f"{', '.join([*GROUPS, *defaults])} (configs/config.yaml)")
        if rest and isinstance(defaults[head], dict) and rest.split(".")[0] not in defaults[head]:
            known = list(defaults[head])
            raise SpecError(f"{head} has no key {rest!r}", f"{did_you_mean(rest, known)}{head} keys: {', '.join(known)}")


def _check_knob(method_config: str, knob: str) -> None:
    import dataclasses

    from scbench.registry import METHODS
    from scbench.validate import SpecError, did_you_mean

    if method_config not in group_choices("method"):
        return  # refused above as an unknown choice
    name = _method_name(method_config)
    fields = [f.name for f in dataclasses.fields(METHODS.get(name))]
    if knob not in fields and knob != "name":
        raise SpecError(f"method {name!r} has no knob {knob!r}",
                        f"{did_you_mean(knob, fields)}its knobs: {', '.join(fields) or 'none'}")


def _method_name(config: str) -> str:
    from omegaconf import OmegaConf

    return OmegaConf.load(config_file("method", config)).name
