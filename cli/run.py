"""`gallery run`: load one model and stream an answer to the terminal (and the helpers `gallery chat` shares).

The model is loaded through the runtime's ModelHost (the same spec resolution, load options and engine as
every server interface); MLX is imported only when the command runs. A spinner with the elapsed time shows
while the model loads and while the prompt is processed, the answer streams as it comes, and Ctrl-C stops the
answer with the line ended properly.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from catalog.install import MODELS_DIR_ENV
from cli.output import loud_template_warning, spinner, stderr_console, template_warning, warn
from gallery.errors import RuntimeFailure, UsageError

if TYPE_CHECKING:
    from runtime.engine import RequestHandle
    from runtime.host import ModelHost
    from runtime.request import Completion, GenerationRequest

app = typer.Typer()

ModelsDirOpt = Annotated[
    Path | None,
    typer.Option(
        "--models-dir",
        help="Look installed models up in this plain folder too ($GALLERY_MODELS_DIR). Default: the HF cache.",
    ),
]
CatalogOpt = Annotated[
    str | None,
    typer.Option(
        "--catalog", help="Catalog index to look names up in (default: yours, then the bundled one)."
    ),
]
MaxTokensOpt = Annotated[int | None, typer.Option("--max-tokens", min=1, help="Most tokens to generate.")]
TemperatureOpt = Annotated[
    float | None, typer.Option("--temperature", min=0.0, help="Sampling temperature (0: greedy).")
]
SeedOpt = Annotated[int | None, typer.Option("--seed", min=0, help="Random seed.")]
ImageOpt = Annotated[list[Path] | None, typer.Option("--image", help="An image file (repeatable).")]
AllowDownloadOpt = Annotated[
    bool, typer.Option("--allow-download", help="Download the weights if they are not installed.")
]
StrictOpt = Annotated[bool, typer.Option("--strict", help="Refuse a config without a chat template.")]


def image_paths(paths: list[Path] | None) -> list[str]:
    """Image files as absolute paths, checked first (a bare name like red.png is a file, never base64)."""
    found = []
    for path in paths or []:
        resolved = path.expanduser()
        if not resolved.is_file():
            raise UsageError(f"image {path}: no such file")
        found.append(str(resolved.resolve()))
    return found


def load_host(
    spec: str,
    *,
    catalog: str | None,
    models_dir: Path | None,
    allow_download: bool,
    strict: bool,
) -> ModelHost:
    """Resolve and load a model with a spinner; print its warnings once. The caller closes the host."""
    from runtime.host import ModelHost

    if models_dir is not None:
        os.environ[MODELS_DIR_ENV] = str(models_dir)  # the resolver's documented setting, for this process
    logging.getLogger("runtime").setLevel(logging.ERROR)  # its warnings are shown below, once, in plain words
    host = ModelHost(interface="cli", catalog=catalog)
    with spinner(f"loading {spec}"):
        report = host.load(spec, {"allow_download": allow_download, "strict": strict})
    assert host.engine is not None
    config = host.engine.config
    quiet = template_warning(config) is not None  # the template warning below replaces theirs
    for message in [*report.import_warnings, *report.warnings]:
        if not (quiet and "template" in message.lower()):
            warn(message)
    loud_template_warning(config)
    return host


@dataclasses.dataclass
class Streamed:
    """What streaming an answer printed and how it ended."""

    completion: Completion
    printed: bool


def stream_answer(
    handle: RequestHandle, *, reasoning_to_stderr: bool, show_reasoning: bool = True, quiet: bool = False
) -> Streamed:
    """Print an answer as it streams (a spinner until the first piece); Ctrl-C cancels it and re-raises.

    Content goes to stdout; reasoning goes to stderr (`run`) or dimmed to stdout (`chat`).
    """
    from runtime.request import Answer

    answer = Answer()
    printed = False
    in_reasoning = False
    reasoning_console = stderr_console() if reasoning_to_stderr else None
    try:
        with spinner("processing the prompt") as status:
            events = iter(handle)
            first = next(events)
            status.update("answering")
        for event in _chain(first, events):
            answer.add(event)
            if quiet:
                continue
            if event.reasoning and show_reasoning:
                if reasoning_console is not None:
                    if not in_reasoning:
                        reasoning_console.print("[reasoning] ", end="", style="dim", markup=False)
                    reasoning_console.print(event.reasoning, end="", style="dim", markup=False)
                else:
                    from cli.output import stdout_console

                    stdout_console().print(event.reasoning, end="", style="dim italic", markup=False)
                    printed = True
                in_reasoning = True
            if event.content:
                if in_reasoning:
                    (sys.stderr if reasoning_console is not None else sys.stdout).write("\n")
                    in_reasoning = False
                sys.stdout.write(event.content)
                sys.stdout.flush()
                printed = True
            for call in event.tool_calls:
                sys.stdout.write(f"\n[tool call] {call.name}({call.arguments})")
                printed = True
    except KeyboardInterrupt:
        handle.cancel()
        sys.stdout.write("\n")  # end the partial answer's line (or the ^C the terminal echoed)
        sys.stdout.flush()
        raise
    return Streamed(answer.completion(), printed)


def _chain(first: Any, rest: Any) -> Any:
    yield first
    yield from rest


def usage_line(completion: Completion) -> str:
    """One line of usage and speed after an answer."""
    usage, timings = completion.usage, completion.timings
    return (
        f"[{completion.finish_reason}; route {completion.route}; prompt {usage.prompt_tokens} tokens "
        f"({timings.prompt_tps:.1f} tok/s); completion {usage.completion_tokens} tokens "
        f"({timings.generation_tps:.1f} tok/s); first token after {timings.prompt_s:.2f} s]"
    )


def completion_data(completion: Completion) -> dict[str, Any]:
    """An answer as JSON-ready data (what `--json` prints)."""
    return {
        "content": completion.content,
        "reasoning": completion.reasoning or None,
        "tool_calls": [{"name": c.name, "arguments": c.arguments} for c in completion.tool_calls],
        "finish_reason": completion.finish_reason,
        "route": completion.route,
        "usage": dataclasses.asdict(completion.usage),
        "timings": dataclasses.asdict(completion.timings),
    }


def read_prompt(prompt: str | None) -> str:
    """The prompt: -p TEXT, or stdin when -p - is given or stdin is piped."""
    if prompt is not None and prompt != "-":
        return prompt
    if prompt is None and sys.stdin.isatty():
        raise UsageError("give the prompt with -p TEXT, or pipe it on stdin (`-p -` reads stdin)")
    text = sys.stdin.read()
    if not text.strip():
        raise UsageError("the prompt read from stdin is empty")
    return text.rstrip("\n")


def build_request(
    prompt: str,
    *,
    images: list[str],
    system: str | None,
    raw: bool,
    max_tokens: int | None,
    temperature: float | None,
    seed: int | None,
    thinking: bool | None,
    history: list[dict[str, Any]] | None = None,
) -> GenerationRequest:
    """The generation request for one prompt (chat messages through the template, or a raw prompt); `history`
    is the conversation so far (after the system message, before the new user message)."""
    from runtime.messages import MediaItem
    from runtime.request import GenerationRequest

    if raw:
        request = GenerationRequest(
            prompt=prompt, media=[MediaItem(kind="image", data=path) for path in images]
        )
    else:
        parts: list[dict[str, Any]] = [{"type": "image", "image": path} for path in images]
        content: object = [*parts, {"type": "text", "text": prompt}] if parts else prompt
        messages = [
            *([{"role": "system", "content": system}] if system else []),
            *(history or []),
            {"role": "user", "content": content},
        ]
        request = GenerationRequest(messages=messages)
    request.max_tokens = max_tokens
    request.temperature = temperature
    request.seed = seed
    request.enable_thinking = thinking
    return request


@app.command()
def run(
    config: Annotated[str, typer.Argument(help="A catalog name, config file, model folder or Hub repo id.")],
    prompt: Annotated[
        str | None,
        typer.Option(
            "--prompt", "-p", help="The user message (or the raw prompt with --raw); `-' or none: read stdin."
        ),
    ] = None,
    image: ImageOpt = None,
    system: Annotated[str | None, typer.Option("--system", help="A system message.")] = None,
    max_tokens: MaxTokensOpt = None,
    no_thinking: Annotated[bool, typer.Option("--no-thinking", help="Turn reasoning off.")] = False,
    thinking: Annotated[bool, typer.Option("--thinking", help="Turn reasoning on.")] = False,
    temperature: TemperatureOpt = None,
    seed: SeedOpt = None,
    raw: Annotated[
        bool, typer.Option("--raw", help="Send the prompt as-is, without the chat template.")
    ] = False,
    allow_download: AllowDownloadOpt = False,
    strict: StrictOpt = False,
    catalog: CatalogOpt = None,
    models_dir: ModelsDirOpt = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the whole answer as JSON at the end.")
    ] = False,
) -> None:
    """Run one prompt and stream the answer (reasoning goes to stderr); the prompt may come on stdin."""
    if thinking and no_thinking:
        raise UsageError("--thinking and --no-thinking contradict each other")
    images = image_paths(image)
    text = read_prompt(prompt)
    request = build_request(
        text,
        images=images,
        system=system,
        raw=raw,
        max_tokens=max_tokens,
        temperature=temperature,
        seed=seed,
        thinking=False if no_thinking else True if thinking else None,
    )
    host = load_host(
        config, catalog=catalog, models_dir=models_dir, allow_download=allow_download, strict=strict
    )
    try:
        streamed = stream_answer(host.submit(request), reasoning_to_stderr=True, quiet=as_json)
        final = streamed.completion
        if final.error:
            raise RuntimeFailure(final.error)
        if as_json:
            sys.stdout.write(json.dumps(completion_data(final), indent=2, ensure_ascii=False) + "\n")
            return
        sys.stdout.write("\n")
        sys.stdout.flush()
        stderr_console().print(usage_line(final), style="dim", markup=False, soft_wrap=True)
    finally:
        host.close()
