"""`gallery run`: load one model and stream an answer to the terminal.

The model is loaded through the runtime's ModelHost (the same spec resolution, load options and engine as
every server interface); MLX is imported only when the command runs.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from cli.output import loud_template_warning, warn
from gallery.errors import RuntimeFailure, UsageError

app = typer.Typer()


@app.command()
def run(
    config: Annotated[str, typer.Argument(help="A config file, catalog name, model folder or Hub repo id.")],
    prompt: Annotated[
        str, typer.Option("--prompt", "-p", help="The user message (or the raw prompt with --raw).")
    ],
    image: Annotated[list[Path] | None, typer.Option("--image", help="An image file (repeatable).")] = None,
    system: Annotated[str | None, typer.Option("--system", help="A system message.")] = None,
    max_tokens: Annotated[int | None, typer.Option("--max-tokens", help="Most tokens to generate.")] = None,
    no_thinking: Annotated[bool, typer.Option("--no-thinking", help="Turn reasoning off.")] = False,
    thinking: Annotated[bool, typer.Option("--thinking", help="Turn reasoning on.")] = False,
    temperature: Annotated[float | None, typer.Option("--temperature", help="Sampling temperature.")] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="Random seed.")] = None,
    raw: Annotated[
        bool, typer.Option("--raw", help="Send --prompt as-is, without the chat template.")
    ] = False,
    allow_download: Annotated[
        bool, typer.Option("--allow-download", help="Download weights if not cached.")
    ] = False,
    strict: Annotated[
        bool, typer.Option("--strict", help="Refuse a config without a chat template.")
    ] = False,
    catalog: Annotated[
        str | None, typer.Option("--catalog", help="Catalog index to look names up in.")
    ] = None,
) -> None:
    """Run one prompt on a config and stream the answer (reasoning goes to stderr)."""
    from runtime.host import ModelHost
    from runtime.request import GenerationRequest

    if thinking and no_thinking:
        raise UsageError("--thinking and --no-thinking contradict each other")
    media: list[dict[str, Any]] = [{"type": "image", "image": str(path)} for path in image or []]
    if raw:
        from runtime.messages import MediaItem

        request = GenerationRequest(
            prompt=prompt, media=[MediaItem(kind="image", data=str(p)) for p in image or []]
        )
    else:
        content: object = [*media, {"type": "text", "text": prompt}] if media else prompt
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": content}
        ]
        request = GenerationRequest(messages=messages)
    request.max_tokens = max_tokens
    request.temperature = temperature
    request.seed = seed
    request.enable_thinking = False if no_thinking else True if thinking else None
    host = ModelHost(interface="cli", catalog=catalog)
    report = host.load(config, {"allow_download": allow_download, "strict": strict})
    for message in report.import_warnings:
        warn(message)
    assert host.engine is not None
    loud_template_warning(host.engine.config)
    try:
        handle = host.submit(request)
        in_reasoning = False
        final = None
        for event in handle:
            if event.reasoning:
                if not in_reasoning:
                    sys.stderr.write("[reasoning] ")
                    in_reasoning = True
                sys.stderr.write(event.reasoning)
                sys.stderr.flush()
            if event.content:
                if in_reasoning:
                    sys.stderr.write("\n")
                    in_reasoning = False
                sys.stdout.write(event.content)
                sys.stdout.flush()
            for call in event.tool_calls:
                sys.stdout.write(f"\n[tool call] {call.name}({call.arguments})")
            final = event
        sys.stdout.write("\n")
        sys.stdout.flush()
        if final is None or final.error:
            raise RuntimeFailure(final.error if final is not None and final.error else "no answer")
        usage, timings = final.usage, final.timings
        assert usage is not None and timings is not None
        print(
            f"[{final.finish_reason}; route {final.route}; prompt {usage.prompt_tokens} tokens "
            f"({timings.prompt_tps:.1f} tok/s); completion {usage.completion_tokens} tokens "
            f"({timings.generation_tps:.1f} tok/s); first token after {timings.prompt_s:.2f} s]",
            file=sys.stderr,
        )
    finally:
        host.close()
