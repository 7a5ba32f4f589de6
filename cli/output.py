"""What the CLI prints besides command output: warnings, the missing-template banner, and tables.

Command output goes to stdout (`emit`); everything else (warnings, progress, summaries) goes to stderr, so
piping a command's output never mixes in messages.
"""

from __future__ import annotations

import sys

from gallery.config import ModelConfig


def warn(message: str) -> None:
    """Print a warning line to stderr."""
    print(f"gallery: warning: {message}", file=sys.stderr)


def note(message: str) -> None:
    """Print an informational line to stderr."""
    print(f"gallery: {message}", file=sys.stderr)


def emit(text: str) -> None:
    """Write command output to stdout."""
    sys.stdout.write(text)
    sys.stdout.flush()


def loud_template_warning(config: ModelConfig) -> None:
    """The banner shown whenever a config has no usable chat template."""
    template = config.mlx.chat_template
    if template.status == "pinned":
        return
    why = (
        "none was found in any home"
        if template.status == "missing"
        else f"the one in {template.source} is unusable"
    )
    print(
        f"gallery: WARNING: {config.name} HAS NO CHAT TEMPLATE ({why}). Chat requests will not be formatted "
        "the way the model was trained; answers may be garbage.",
        file=sys.stderr,
    )
