"""`gallery chat`: an interactive multi-turn conversation with one model in the terminal.

The whole conversation is sent every turn (the engine's prefix cache makes the shared beginning cheap), the
answer streams as it comes, and the line editor keeps what you typed (readline, when Python has it).
Commands: /image PATH, /think on|off, /system TEXT, /reset, /help, /exit (or Ctrl-D). Ctrl-C stops the
current answer and keeps the session; at the prompt it only reminds how to leave.
"""

from __future__ import annotations

import contextlib
import shlex
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from cli.output import stderr_console, warn
from cli.run import (
    AllowDownloadOpt,
    CatalogOpt,
    ImageOpt,
    MaxTokensOpt,
    ModelsDirOpt,
    SeedOpt,
    StrictOpt,
    TemperatureOpt,
    build_request,
    image_paths,
    load_host,
    stream_answer,
)
from gallery.errors import GalleryError, UsageError

app = typer.Typer()

HELP = (
    "commands: /image PATH (attach an image to your next message), /think on|off, /system TEXT, "
    "/reset (forget the conversation), /help, /exit (or Ctrl-D); Ctrl-C stops an answer"
)


class Conversation:
    """The turns so far, the system message, the images waiting for the next message, the thinking switch."""

    def __init__(self, system: str | None, thinking: bool | None) -> None:
        self.system = system
        self.thinking = thinking
        self.turns: list[dict[str, Any]] = []
        self.pending_images: list[str] = []


def command(line: str, conversation: Conversation) -> bool:
    """Run one /command; returns False when the session should end."""
    name, _, rest = line.partition(" ")
    rest = rest.strip()
    console = stderr_console()
    if name in ("/exit", "/quit", "/bye"):
        return False
    if name == "/help":
        console.print(HELP, style="dim", markup=False)
    elif name == "/reset":
        conversation.turns.clear()
        conversation.pending_images.clear()
        console.print("(conversation cleared)", style="dim")
    elif name == "/system":
        conversation.system = rest or None
        console.print(f"(system message {'set' if rest else 'removed'})", style="dim")
    elif name == "/think":
        if rest not in ("on", "off"):
            warn("use /think on or /think off")
        else:
            conversation.thinking = rest == "on"
            console.print(f"(thinking {rest})", style="dim")
    elif name == "/image":
        if not rest:
            warn("use /image PATH")
            return True
        try:
            paths = image_paths([Path(p) for p in shlex.split(rest)])
        except (UsageError, ValueError) as exc:
            warn(str(exc))
            return True
        conversation.pending_images.extend(paths)
        console.print(
            f"(attached {', '.join(Path(p).name for p in paths)} to your next message)", style="dim"
        )
    else:
        warn(f"unknown command {name}; {HELP}")
    return True


def _read(prompt: str) -> str | None:
    """One line from the user; None at end of input (Ctrl-D)."""
    try:
        return input(prompt)
    except EOFError:
        return None


@app.command()
def chat(
    config: Annotated[str, typer.Argument(help="A catalog name, config file, model folder or Hub repo id.")],
    system: Annotated[str | None, typer.Option("--system", help="A system message.")] = None,
    image: ImageOpt = None,
    thinking: Annotated[
        bool | None,
        typer.Option("--thinking/--no-thinking", help="Reasoning on or off (default: the model's)."),
    ] = None,
    max_tokens: MaxTokensOpt = None,
    temperature: TemperatureOpt = None,
    seed: SeedOpt = None,
    allow_download: AllowDownloadOpt = False,
    strict: StrictOpt = False,
    catalog: CatalogOpt = None,
    models_dir: ModelsDirOpt = None,
) -> None:
    """Chat with a model: multi-turn, streamed, with /image, /think, /system, /reset and /exit."""
    with contextlib.suppress(
        ImportError
    ):  # line editing and a history of what was typed, where Python has it
        import readline  # noqa: F401
    conversation = Conversation(system, thinking)
    conversation.pending_images.extend(image_paths(image))
    host = load_host(
        config, catalog=catalog, models_dir=models_dir, allow_download=allow_download, strict=strict
    )
    assert host.engine is not None
    loaded = host.engine.config
    if loaded.mlx.chat_template.status != "pinned":
        host.close()
        raise UsageError(
            f"{loaded.name} has no chat template, so it cannot chat; use `gallery run {config} --raw -p TEXT`"
        )
    console = stderr_console()
    console.print(
        f"chatting with {loaded.name} ({loaded.backend}) · /help for commands, Ctrl-D to leave",
        style="dim",
        markup=False,
    )
    try:
        while True:
            try:
                line = _read(">>> ")
            except KeyboardInterrupt:
                sys.stdout.write("\n")
                console.print("(use /exit or Ctrl-D to leave)", style="dim")
                continue
            if line is None:
                sys.stdout.write("\n")
                break
            text = line.strip()
            if not text:
                continue
            if text.startswith("/"):
                if not command(text, conversation):
                    break
                continue
            images, conversation.pending_images = conversation.pending_images, []
            _turn(host, conversation, text, images, max_tokens, temperature, seed)
    finally:
        host.close()


def _turn(
    host: Any,
    conversation: Conversation,
    text: str,
    images: list[str],
    max_tokens: int | None,
    temperature: float | None,
    seed: int | None,
) -> None:
    """Send one user message with the conversation so far; keep both turns when the answer completes."""
    console = stderr_console()
    request = build_request(
        text,
        images=images,
        system=conversation.system,
        raw=False,
        max_tokens=max_tokens,
        temperature=temperature,
        seed=seed,
        thinking=conversation.thinking,
        history=conversation.turns,
    )
    try:
        handle = host.submit(request)
        streamed = stream_answer(handle, reasoning_to_stderr=False)
    except KeyboardInterrupt:
        console.print("(answer stopped; this turn is not kept)", style="dim")
        return
    except GalleryError as exc:  # a bad image, media for a text model, …: say so and keep the session
        warn(str(exc))
        return
    final = streamed.completion
    sys.stdout.write("\n")
    sys.stdout.flush()
    if final.error:
        warn(final.error)
        return
    conversation.turns.append(request.messages[-1])
    conversation.turns.append({"role": "assistant", "content": final.content})
    usage, timings = final.usage, final.timings
    reason = "" if final.finish_reason == "stop" else f" · {final.finish_reason}"
    console.print(
        f"(prompt {usage.prompt_tokens} tokens, {usage.cached_tokens} cached · answer {usage.completion_tokens} "
        f"tokens, {timings.generation_tps:.1f} tok/s · first token {timings.prompt_s:.1f} s{reason})",
        style="dim",
        markup=False,
    )
