"""Environments: the protocol (base.py), the built-in ones, and plugin loading by import path."""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from typing import Any

from .base import Environment, EnvironmentConfigError, Observation, Task, require_module

__all__ = [
    "BUILTIN_ENVIRONMENTS",
    "Environment",
    "EnvironmentConfigError",
    "Observation",
    "Task",
    "environment_class",
    "environment_factory",
    "environment_split",
    "require_module",
]

#: name in the config -> "module:Class" of the environments that ship with sdar
BUILTIN_ENVIRONMENTS = {
    "household": "sdar_cli.envs.builtin:HouseholdEnv",
    "alfworld": "sdar_cli.envs.alfworld:ALFWorldEnv",
    "textworld": "sdar_cli.envs.textworld:TextWorldEnv",
    "searchqa": "sdar_cli.envs.searchqa:SearchQAEnv",
    "webshop": "sdar_cli.envs.webshop:WebShopEnv",
}


def environment_class(name: str) -> type[Environment]:
    """The class a built-in name ('household') or a plugin 'module.path:ClassName' names."""
    target = BUILTIN_ENVIRONMENTS.get(name, name)
    module_name, sep, class_name = target.partition(":")
    if not sep or not module_name or not class_name:
        raise EnvironmentConfigError(
            f"env.name '{name}' is neither a built-in environment ({', '.join(BUILTIN_ENVIRONMENTS)}) nor a plugin "
            "path of the form 'module.path:ClassName'."
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise EnvironmentConfigError(f"env.name '{name}': cannot import module '{module_name}': {err}") from None
    except Exception as err:  # noqa: BLE001 - a plugin's own bug (syntax error, raise at import) is the user's to fix
        where = f" ({err.filename}, line {err.lineno})" if isinstance(err, SyntaxError) else ""
        raise EnvironmentConfigError(
            f"env.name '{name}': importing module '{module_name}' failed with {type(err).__name__}: {err}{where}. "
            "Fix the plugin module (run `python -c \"import " + module_name + "\"` to see the full error)."
        ) from None
    cls = getattr(module, class_name, None)
    if not (inspect.isclass(cls) and issubclass(cls, Environment)):
        raise EnvironmentConfigError(
            f"env.name '{name}': '{class_name}' in module '{module_name}' must be a subclass of "
            "sdar_cli.envs.base.Environment."
        )
    return cls


def environment_factory(name: str, kwargs: dict[str, Any]) -> Callable[[], Environment]:
    """A zero-argument callable that builds a fresh, independent environment object each call.

    `name` is a built-in name ('household') or a plugin 'module.path:ClassName'. One object is built
    here, so a wrong class, wrong keyword arguments or missing data fail before training starts.
    """
    cls = environment_class(name)
    class_name = cls.__name__

    def make() -> Environment:
        return cls(**kwargs)

    try:
        make().close()
    except EnvironmentConfigError:
        raise
    except TypeError as err:
        raise EnvironmentConfigError(f"env.kwargs do not fit {class_name}: {err}") from None
    except ValueError as err:
        raise EnvironmentConfigError(f"env.kwargs rejected by {class_name}: {err}") from None
    return make


def environment_split(name: str, kwargs: dict[str, Any], split: str) -> tuple[Callable[[], Environment], list[str], int]:
    """The environment factory, the task ids of `split` and the environment's own turn limit, read from one
    environment object built and closed here. An unknown split raises the environment's ValueError."""
    make_env = environment_factory(name, kwargs)
    env = make_env()
    try:
        return make_env, list(env.task_ids(split)), env.max_turns
    finally:
        env.close()

