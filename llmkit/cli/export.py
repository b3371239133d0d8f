"""``llmkit export --model RUN --format gguf --output FILE``: a model for llama.cpp and Ollama."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from llmkit.cli._common import user_errors
from llmkit.errors import UserError


@user_errors
def export_command(
    model: str = typer.Option(
        ...,
        "--model",
        "-m",
        help="A run of llmkit train, a save_pretrained directory, a .gguf file or a Hub id.",
    ),
    output: Path = typer.Option(..., "--output", "-o", help="The .gguf file to write."),
    fmt: str = typer.Option("gguf", "--format", help="Output format: gguf."),
    outtype: str = typer.Option(
        "f16", "--outtype", help="Type of the weight matrices: f32, f16, bf16 or q8_0."
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output."),
    trust_remote_code: bool = typer.Option(
        False, "--trust-remote-code", help="Let a model that ships its own Python code run it."
    ),
) -> None:
    """Export a model to GGUF (llama.cpp, Ollama, LM Studio) with an Ollama Modelfile beside it.

    Supported: GPT-2 and Llama-family models (grouped-query attention included) with a
    byte-level BPE tokenizer; a LoRA run is exported merged. --outtype f32|f16|bf16|q8_0 sets
    the type of the weight matrices (norms, biases and position embeddings stay f32). Writes
    FILE and FILE-without-.gguf.Modelfile (ollama create NAME -f that file); the file is
    written under a temporary name, read back and checked, then renamed.
    """
    if fmt.lower() != "gguf":
        raise UserError(f"unknown --format {fmt!r}", "llmkit exports gguf")
    from llmkit.export.gguf import export_gguf, summary

    result = export_gguf(
        model, output, outtype=outtype, overwrite=overwrite, trust_remote_code=trust_remote_code
    )
    sys.stderr.write(summary(result) + "\n")
    typer.echo(str(result.path))


def register(app: typer.Typer) -> None:
    app.command("export")(export_command)
