"""`gallery serve`: the runtime's serve command (runtime.serve), registered on the `gallery` app.

It takes one option more than `python -m runtime`: --models-dir, the plain folder installed models are also
looked up in (like run and chat); the resolver reads it as $GALLERY_MODELS_DIR, which a server process keeps.
"""

from __future__ import annotations

import functools
import inspect
import os
import typing
from pathlib import Path
from typing import Annotated, Any

import typer

from catalog.install import MODELS_DIR_ENV
from runtime.serve import serve_command

app = typer.Typer()

_MODELS_DIR = inspect.Parameter(
    "models_dir",
    inspect.Parameter.KEYWORD_ONLY,
    default=None,
    annotation=Annotated[
        Path | None,
        typer.Option(
            "--models-dir", help="Look installed models up in this plain folder too ($GALLERY_MODELS_DIR)."
        ),
    ],
)


@functools.wraps(serve_command)
def _serve(*args: Any, models_dir: Path | None = None, **kwargs: Any) -> None:
    if models_dir is not None:
        os.environ[MODELS_DIR_ENV] = str(models_dir.expanduser().resolve())
    serve_command(*args, **kwargs)


# typer reads the signature: serve_command's own parameters (annotations evaluated, so their help survives)
# plus --models-dir; no second copy of the options.
_hints = typing.get_type_hints(serve_command, include_extras=True)
_parameters = [
    p.replace(annotation=_hints.get(p.name, p.annotation))
    for p in inspect.signature(serve_command).parameters.values()
]
_serve.__signature__ = inspect.Signature([*_parameters, _MODELS_DIR])  # type: ignore[attr-defined]
_serve.__annotations__ = {p.name: p.annotation for p in [*_parameters, _MODELS_DIR]}
del _serve.__wrapped__
app.command("serve")(_serve)
