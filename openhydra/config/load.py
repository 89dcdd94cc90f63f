"""Finding, composing and validating the node config, with one-line errors.

`conf/` lives at the repository top level (the design card) and is shipped inside the wheel as
`openhydra/conf`; `conf_dir()` finds whichever exists.
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from pydantic import BaseModel, ValidationError

from openhydra.config.schema import EXTERNAL_GROUP_SCHEMAS, NodeConfig, group_schema

GROUPS = ("hardware", "model", "shard", "discovery", "privacy", "verification", "economy", "compaction", "api",
          "speculative", "serving")


class ConfigError(ValueError):
    """A config problem, phrased as one line naming the key and what is allowed."""


def conf_dir() -> Path:
    package = Path(__file__).resolve().parent.parent
    for candidate in (package / "conf", package.parent / "conf"):
        if (candidate / "config.yaml").exists():
            return candidate
    raise ConfigError(f"no conf/ directory found next to {package}")


# Hydra warns when a searchpath entry is missing; the user config dir exists only once something is written.
warnings.filterwarnings("ignore", message=r"provider=hydra\.searchpath in main, path=.* is not available")


def user_config_dir() -> Path:
    """Where the user's own config lives (the hydra.searchpath entry in conf/config.yaml says the same)."""
    if os.environ.get("OPENHYDRA_CONFIG_DIR"):
        return Path(os.environ["OPENHYDRA_CONFIG_DIR"]).expanduser()
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.environ.get("HOME", "."), ".config")
    return Path(base) / "openhydra"


_EXTRA_DIRS: list[Path] = []  # Hydra's --config-dir folders of this command line (cli.preflight sets them)


def also_search(folders: list[Path]) -> None:
    """The folders a command line adds with ``--config-dir``: their options are offered by ``group_options`` too."""
    _EXTRA_DIRS[:] = folders


def group_options(group: str) -> list[str]:
    """The options of ``group``: the shipped ones and the user's own (``user_config_dir()/group/NAME.yaml``, which
    Hydra's search path composes too; an operator's probe found their recipes missing from --help and errors), and
    those of a ``--config-dir`` folder."""
    folders = [conf_dir() / group, user_config_dir() / group, *(d / group for d in _EXTRA_DIRS)]
    return sorted({p.stem for folder in folders if folder.is_dir() for p in folder.glob("*.yaml")})


def _format_validation(prefix: str, exc: ValidationError) -> str:
    errors = exc.errors(include_url=False)
    first = errors[0]
    loc = ".".join(str(p) for p in (prefix, *first["loc"]) if p != "")
    message = first["msg"]
    if first["type"] == "extra_forbidden":
        parent = ".".join(loc.split(".")[:-1])
        schema = _schema_at(parent)
        allowed = ", ".join(sorted(schema.model_fields)) if schema else "?"
        return f"{loc} is not a config key; keys under {parent or 'the root'}: {allowed}"
    if first["type"] == "missing":
        return f"{loc} is required but missing (set it with {loc}=VALUE)"
    given = first.get("input")
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    message = message.removeprefix("Value error, ")
    # a secret is not echoed into logs and terminals, even a wrong one
    secret = loc.rsplit(".", 1)[-1].endswith(("token", "secret", "password"))
    shown = "" if isinstance(given, dict) or secret else f" (got {given!r})"
    return f"{loc}: {message}{shown}{more}" if loc else f"{message}{more}"  # a rule across groups: no one key


def _schema_at(path: str) -> type[BaseModel] | None:
    schema: type[BaseModel] = NodeConfig
    for part in [p for p in path.split(".") if p]:
        if part in EXTERNAL_GROUP_SCHEMAS:
            schema = group_schema(part)
            continue
        field = schema.model_fields.get(part)
        annotation = getattr(field, "annotation", None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return None
        schema = annotation
    return schema


def validate(cfg: DictConfig | dict) -> NodeConfig:
    """Resolve interpolations and validate every group; raise ConfigError with one line."""
    if isinstance(cfg, DictConfig):
        try:
            data = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
        except Exception as exc:  # MissingMandatoryValue, InterpolationResolutionError
            key = getattr(exc, "full_key", "") or ""
            text = _first_line(str(exc))
            unset = re.search(r"Environment variable '([^']+)' not found", text)
            if unset:  # ${oc.env:NAME} with no default (recipes/private-swarm.yaml's secret): say what to do
                text = f"needs the environment variable {unset.group(1)}, which is not set (export it)"
            raise ConfigError(f"{key}: {text}" if key else text) from None
    else:
        data = dict(cfg)
    data.pop("hydra", None)
    try:
        node = NodeConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_validation("", exc)) from None
    for group in EXTERNAL_GROUP_SCHEMAS:
        try:
            group_schema(group).model_validate(data.get(group) or {})
        except ValidationError as exc:
            raise ConfigError(_format_validation(group, exc)) from None
    if node.node.peer_id and (data.get("privacy") or {}).get("encrypt_activations"):
        raise ConfigError(
            f"node.peer_id={node.node.peer_id} cannot be combined with activation encryption: the peer id is "
            "derived from the identity key so records can be signed (drop node.peer_id, or use privacy=off)"
        )
    return node


def _options_having(key: str) -> list[str]:
    """The options of ``key``'s group (its first part) whose YAML sets ``key``: ``discovery.http.urls`` -> [dual,
    http]."""
    group, _, rest = key.partition(".")
    if group not in GROUPS or not rest:
        return []
    from omegaconf import OmegaConf

    having = []
    for option in group_options(group):
        try:
            loaded = OmegaConf.load(conf_dir() / group / f"{option}.yaml")
        except Exception:  # an option file that does not parse is Hydra's to report, not this hint's
            continue
        node = OmegaConf.to_container(loaded, resolve=False)
        for part in rest.split("."):
            node = node.get(part, _MISSING) if isinstance(node, dict) else _MISSING
        if node is not _MISSING:
            having.append(option)
    return having


_MISSING = object()


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else text


def explain_hydra_error(exc: BaseException) -> str:
    """Hydra's multi-line composition errors, as one line naming the key and the allowed values."""
    text = str(exc)
    missing = re.search(r"Could not find '([^']+)/([^']+)'", text)
    if missing:
        group, option = missing.groups()
        allowed = ", ".join(group_options(group)) or "none"
        return f"{group}={option} is not an option of group '{group}'; allowed: {allowed}"
    override = re.search(r"Could not override '([^']+)'", text) or re.search(r"Key '([^']+)' is not in struct", text)
    if override:
        key = override.group(1)
        parent = ".".join(key.split(".")[:-1])
        if key.split(".")[0] == "recipe":  # an optional group, not in the defaults: added with a +
            return (f"recipes are added with a plus: +recipe=<name> (allowed: {', '.join(group_options('recipe'))})"
                    f"; {key} alone is not a config key")
        if not parent and key in GROUPS:
            return f"{key}: pick an option of the group; allowed: {', '.join(group_options(key))}"
        having = _options_having(key)
        if having:  # a real key, of another option of its group than the one composed
            group = key.split(".")[0]
            return (f"{key} is not a key of the {group} option this config uses; "
                    f"{', '.join(f'{group}={o}' for o in having)} {'has' if len(having) == 1 else 'have'} it")
        schema = _schema_at(parent)
        if schema is not None:
            allowed = ", ".join(sorted(schema.model_fields))
            where = f"keys under {parent}" if parent else f"groups: {', '.join(GROUPS)}; keys"
            return f"{key} is not a config key; {where}: {allowed}"
        return f"{key} is not a config key"
    group_err = re.search(r"Could not load '([^']+)'", text)
    if group_err:
        return f"could not load config '{group_err.group(1)}'"
    return _first_line(text)
