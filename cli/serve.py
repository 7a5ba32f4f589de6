"""`gallery serve`: the runtime's serve command (runtime.serve), registered on the `gallery` app."""

from __future__ import annotations

import typer

from runtime.serve import serve_command

app = typer.Typer()
app.command("serve")(serve_command)
