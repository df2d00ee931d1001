"""What every pretrained loader shares: the error type and models shipped inside packages."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

__all__ = ["NamedModel", "PretrainedError", "package_folder"]


class PretrainedError(ValueError):
    """A pretrained model that cannot be found or read: the message says what to do."""


@dataclass(frozen=True)
class NamedModel:
    """A pretrained model shipped inside an installable package.

    Attributes:
        package: the import name of the package (located without importing it).
        subfolder: the folder inside the package that holds the model.
        install: the command that installs the package.
        description: one line for messages.
        file: a single model file inside ``subfolder`` (a GGUF file), or ``""`` for a
            Hugging Face-layout folder.
    """

    package: str
    subfolder: str
    install: str
    description: str
    file: str = ""


def package_folder(name: str, model: NamedModel) -> Path:
    """The folder ``model.subfolder`` inside the installed ``model.package``, found with
    ``importlib.util.find_spec`` without importing the package.

    Raises:
        PretrainedError: the package is not installed (the message gives the install command).
    """
    spec = importlib.util.find_spec(model.package)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise PretrainedError(
            f"pretrained model {name!r} ({model.description}) needs the package "
            f"{model.package}: {model.install}"
        )
    return Path(locations[0]) / model.subfolder
