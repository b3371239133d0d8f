"""``llmkit eval --model MODEL [--model ...] --data DIR_OR_FILE``: loss, perplexity and bits per
byte of one or more models side by side; ``--tokens TEXT``: the probability of each token;
``--tasks hellaswag,arc_easy``: lm-evaluation-harness benchmarks (the ``eval`` extra)."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import typer

from llmkit.cli._common import check_device_dtype, threads_option, user_errors, utf8_text
from llmkit.errors import UserError


@contextmanager
def _progress_bar(enabled: bool, label: str = "scoring") -> Iterator:
    """A ``progress(done, total)`` callback drawing a transient bar on stderr, or None."""
    if not enabled:
        yield None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    from llmkit.core.console import make_console

    bar = Progress(
        label,
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=make_console(stderr=True),
        transient=True,
    )
    task = bar.add_task(label, total=None)
    with bar:
        yield lambda done, total: bar.update(task, completed=done, total=total)


def results_table(results: dict | list[dict]):
    """A rich table of evaluations, one row per model: data, tokens, loss, perplexity, bits per
    byte. The best (lowest) bits per byte is marked when there are several rows."""
    from rich.table import Table

    rows = [results] if isinstance(results, dict) else list(results)
    best = min(r["bits_per_byte"] for r in rows) if len(rows) > 1 else None
    datas = {r["data"] for r in rows}
    # Fits 80 columns: one data set goes in the title; paths fold instead of wrapping at
    # 8 characters, the numbers never wrap, and the units are in the caption.
    one_data = len(datas) == 1
    table = Table(title=f"llmkit eval on {rows[0]['data']}" if one_data else "llmkit eval")
    table.add_column("model", overflow="fold", min_width=12)
    if not one_data:
        table.add_column("data", overflow="fold", min_width=12)
    for name in ("tokens", "loss", "perplexity", "bits per byte"):
        table.add_column(name, justify="right", no_wrap=True)
    for result in rows:
        mark = " *" if best is not None and result["bits_per_byte"] == best else ""
        table.add_row(
            result["model"],
            *([] if one_data else [result["data"]]),
            f"{result['tokens']:,}",
            f"{result['loss']:.4f}",
            f"{result['perplexity']:.2f}",
            f"{result['bits_per_byte']:.4f}{mark}",
        )
    caption = "loss in nats/token"
    if best is not None:
        caption += "; * lowest bits per byte (comparable across tokenizers)"
    table.caption = caption
    return table


def tasks_table(results: dict | list[dict]):
    """A rich table of lm-evaluation-harness results, one row per task and metric and one
    column per model (value ± standard error), so that several models sit side by side."""
    from rich.table import Table

    runs = [results] if isinstance(results, dict) else list(results)
    table = Table(title="llmkit eval: lm-evaluation-harness")
    table.add_column("task", overflow="fold")
    table.add_column("shots", justify="right", no_wrap=True)
    table.add_column("docs", justify="right", no_wrap=True)
    table.add_column("metric", no_wrap=True)
    for run in runs:
        table.add_column(run["model"], justify="right", overflow="fold")
    first = runs[0]["tasks"]
    for task, record in first.items():
        for metric in record["metrics"]:
            cells = []
            for run in runs:
                m = run["tasks"].get(task, {}).get("metrics", {}).get(metric)
                if m is None or m["value"] is None:
                    cells.append("-")
                    continue
                err = f" ± {m['stderr']:.4f}" if m["stderr"] is not None else ""
                cells.append(f"{m['value']:.4f}{err}")
            better = record["higher_is_better"].get(metric)
            arrow = {True: " ↑", False: " ↓"}.get(better, "")
            shots = record["num_fewshot"]
            table.add_row(
                task,
                "" if shots is None else str(shots),
                "" if record["samples"] is None else f"{record['samples']:,}",
                metric + arrow,
                *cells,
            )
    limit = runs[0].get("limit")
    table.caption = "± standard error; ↑ higher is better" + (
        f"; --limit {limit}: first documents only, for testing, not for reporting" if limit else ""
    )
    return table


def probability_style(prob: float) -> str:
    """The colour of a token of probability ``prob``: green ≥ 0.5, yellow ≥ 0.1, orange ≥ 0.01,
    red below."""
    if prob >= 0.5:
        return "black on green"
    if prob >= 0.1:
        return "black on yellow"
    if prob >= 0.01:
        return "black on dark_orange"
    return "white on red"


def render_tokens(view: dict):
    """The rich renderables of a :func:`~llmkit.evaluation.evaluate.token_probabilities` view:
    the text coloured token by token, the chain-rule total, and a table with the top
    alternatives when they were asked for."""
    from rich.table import Table
    from rich.text import Text

    out = []
    text = Text()
    for tok in view["tokens"]:
        text.append(tok["token"] or "·", style=probability_style(tok["prob"]))
    out.append(Text(f"{view['model']}", style="bold"))
    out.append(text)
    legend = Text("p ≥ 0.5 ", style=probability_style(0.5))
    legend.append("p ≥ 0.1 ", style=probability_style(0.1))
    legend.append("p ≥ 0.01 ", style=probability_style(0.01))
    legend.append("p < 0.01", style=probability_style(0.0))
    out.append(legend)
    out.append(
        Text(
            f"log P(text) = Σ log P(x_i | x_<i) = {view['logprob']:.4f} nats over "
            f"{view['n_tokens']} tokens; perplexity {view['perplexity']:.2f}, "
            f"{view['bits_per_byte']:.4f} bits per byte"
        )
    )
    if view["tokens"] and "top" in view["tokens"][0]:
        table = Table()
        table.add_column("#", justify="right")
        table.add_column("token")
        table.add_column("P", justify="right")
        table.add_column("log P (nats)", justify="right")
        table.add_column("most likely instead")
        for i, tok in enumerate(view["tokens"], start=1):
            alts = ", ".join(f"{a['token']!r} {a['prob']:.3f}" for a in tok["top"])
            table.add_row(
                str(i),
                Text(repr(tok["token"]), style=probability_style(tok["prob"])),
                f"{tok['prob']:.4f}",
                f"{tok['logprob']:.3f}",
                alts,
            )
        out.append(table)
    return out


@user_errors
def eval_command(
    model: list[str] = typer.Option(
        ...,
        "--model",
        "-m",
        help="Model directory, .gguf file or Hub id (repeatable).",
        show_default=False,
    ),
    data: str = typer.Option(
        None,
        "--data",
        "-d",
        help="A prepared directory (scored block by block), a text file or a directory of .txt.",
        show_default=False,
    ),
    tokens: str = typer.Option(
        None,
        "--tokens",
        help="Show the probability of each token of this text.",
        show_default=False,
    ),
    top: int = typer.Option(0, "--top", help="With --tokens: the N likeliest alternatives."),
    tasks: list[str] = typer.Option(
        None,
        "--tasks",
        help="lm-evaluation-harness tasks, comma-separated (needs pip install 'llmkit[eval]').",
        show_default=False,
    ),
    include_path: list[str] = typer.Option(
        None,
        "--include-path",
        help="With --tasks: a directory of task YAMLs (searched recursively) to add (repeatable).",
        show_default=False,
    ),
    limit: int = typer.Option(
        None,
        "--limit",
        help="With --tasks: the first N documents of each task only (for testing).",
        show_default=False,
    ),
    num_fewshot: int = typer.Option(
        None,
        "--num-fewshot",
        help="With --tasks: examples per prompt (default: the task's, else 0).",
        show_default=False,
    ),
    chat: bool = typer.Option(
        False, "--chat", help="With --tasks: render requests with the model's chat template."
    ),
    split: str = typer.Option("validation", "--split", help="Split of prepared data."),
    max_length: int = typer.Option(
        None,
        "--max-length",
        help="Tokens per window for text (default: the model's positions).",
        show_default=False,
    ),
    stride: int = typer.Option(
        None,
        "--stride",
        help="New tokens scored per window (default: --max-length); smaller = more context.",
        show_default=False,
    ),
    batch_size: int = typer.Option(8, "--batch-size", help="Windows or blocks per forward pass."),
    json_out: bool = typer.Option(False, "--json", help="Print the result as JSON."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:N or mps."),
    dtype: str = typer.Option("auto", "--dtype", help="auto, float32, bfloat16 or float16."),
    threads: int = threads_option(),
    trust_remote_code: bool = typer.Option(
        False,
        "--trust-remote-code",
        help="Let a model that ships Python code of its own (auto_map in config.json or "
        "tokenizer_config.json), or a task its Python functions (!function in an "
        "--include-path YAML) and metric scripts (evaluate.load). Off: such a model or task "
        "is refused and its code never runs.",
    ),
) -> None:
    """Measure loss (nats/token), perplexity and bits per UTF-8 byte of one or more models.

    --model M (repeatable): a model directory, .gguf file or Hub id; several are scored on the
    same data and shown side by side, one row each.
    --data D: a directory from llmkit prepare (its --split scored block by block, like
    validation in training), a text file or a directory of .txt files (sliding windows of
    --max-length tokens advancing by --stride; every token after the first scored exactly once;
    the loss is total nats over total tokens). --batch-size: windows or blocks per forward pass
    (does not change the result).
    --tokens TEXT: instead of --data, show the probability of each token of TEXT given the ones
    before it, coloured by probability, and log P(text) as the sum of their logs (the chain
    rule); --top N adds the N likeliest tokens at each position.
    --tasks hellaswag,arc_easy: benchmarks from lm-evaluation-harness through its Python API
    (pip install 'llmkit[eval]'), run on the model llmkit loaded; --include-path DIR adds task
    YAMLs of your own (examples/eval_tasks has one on local data), --limit N scores the first N
    documents of each task, --num-fewshot K sets the examples per prompt, --chat applies the
    model's chat template; the results are a table with one column per model.
    --json: one JSON object per model, one per line.
    --device auto|cpu|cuda|mps, --dtype auto|float32|bfloat16|float16.
    """
    _check_mode(data, tokens, tasks, include_path, limit, num_fewshot, chat)
    # Every flag is checked before torch is imported (seconds): a mistake is one line at once.
    from llmkit.evaluation.checks import check_eval_args
    from llmkit.runtime import apply_threads, check_threads

    check_threads(threads)
    check_device_dtype(device, dtype)
    check_eval_args(
        data, split=split, batch_size=batch_size, max_length=max_length, stride=stride, top=top
    )
    if limit is not None and limit < 1:
        raise UserError(
            f"--limit {limit} must be at least 1", "give --limit 1 or more (documents per task)"
        )
    if num_fewshot is not None and num_fewshot < 0:
        raise UserError(f"--num-fewshot {num_fewshot} is negative", "use 0 for zero-shot")
    apply_threads(threads)
    if tasks:
        _run_tasks(
            model,
            tasks,
            include_path,
            limit,
            num_fewshot,
            chat,
            batch_size,
            max_length,
            json_out,
            device,
            dtype,
            trust_remote_code,
        )
    elif tokens is not None:
        for name in model:
            _show_tokens(
                name,
                tokens,
                top=top,
                max_length=max_length,
                json_out=json_out,
                device=device,
                dtype=dtype,
                trust_remote_code=trust_remote_code,
            )
    else:
        _score_data(
            model,
            data,
            split=split,
            max_length=max_length,
            stride=stride,
            batch_size=batch_size,
            json_out=json_out,
            device=device,
            dtype=dtype,
            trust_remote_code=trust_remote_code,
        )


def _check_mode(
    data: str | None,
    tokens: str | None,
    tasks: list[str] | None,
    include_path: list[str] | None,
    limit: int | None,
    num_fewshot: int | None,
    chat: bool,
) -> None:
    """Exactly one of ``--data``, ``--tokens``, ``--tasks``, and the harness's own flags only
    with ``--tasks``.

    Raises:
        UserError: none or several modes; a harness flag without ``--tasks``.
    """
    if tokens is not None:
        if not tokens.strip():
            raise UserError("--tokens is empty", "give the text to score, e.g. --tokens 'To be'")
        utf8_text(tokens, "--tokens")
    given = (("--data", data), ("--tokens", tokens is not None), ("--tasks", tasks))
    modes = [m for m, on in given if on]
    if not modes:
        raise UserError(
            "nothing to score",
            "pass --data DIR_OR_FILE, --tokens 'some text' or --tasks hellaswag,arc_easy",
        )
    if len(modes) > 1:
        raise UserError(f"{' and '.join(modes)} are exclusive", "run them as separate commands")
    harness_only = [
        name
        for name, value in (
            ("--include-path", include_path),
            ("--limit", limit),
            ("--num-fewshot", num_fewshot),
            ("--chat", chat),
        )
        if value
    ]
    if harness_only and not tasks:
        raise UserError(f"{harness_only[0]} goes with --tasks", "add --tasks NAME[,NAME...]")


def _show_tokens(
    model: str,
    text: str,
    *,
    top: int,
    max_length: int | None,
    json_out: bool,
    device: str,
    dtype: str,
    trust_remote_code: bool,
) -> None:
    """``--tokens``: the probability of each token of ``text`` under ``model``, as one JSON
    line or coloured on the terminal (:func:`render_tokens`)."""
    from llmkit.evaluation.evaluate import token_view

    view = token_view(
        model,
        text,
        top=top,
        max_length=max_length,
        device=device,
        dtype=dtype,
        trust_remote_code=trust_remote_code,
    )
    if json_out:
        typer.echo(json.dumps(view, ensure_ascii=False))
        return
    from llmkit.core.console import make_console

    console = make_console()
    for part in render_tokens(view):
        console.print(part)


def _score_data(
    models: list[str],
    data: str,
    *,
    split: str,
    max_length: int | None,
    stride: int | None,
    batch_size: int,
    json_out: bool,
    device: str,
    dtype: str,
    trust_remote_code: bool,
) -> None:
    """``--data``: each model in turn on the same data (one JSON line each as it finishes),
    then one table (:func:`results_table`)."""
    from llmkit.evaluation.evaluate import evaluate

    results = []
    for name in models:
        with _progress_bar(sys.stderr.isatty(), f"scoring {name}") as progress:
            result = evaluate(
                name,
                data,
                split=split,
                max_length=max_length,
                stride=stride,
                batch_size=batch_size,
                device=device,
                dtype=dtype,
                progress=progress,
                trust_remote_code=trust_remote_code,
            )
        results.append(result)
        if json_out:
            typer.echo(json.dumps(result))
    if not json_out:
        from llmkit.core.console import make_console

        make_console().print(results_table(results))


def _run_tasks(
    models: list[str],
    tasks: list[str],
    include_path: list[str] | None,
    limit: int | None,
    num_fewshot: int | None,
    chat: bool,
    batch_size: int,
    max_length: int | None,
    json_out: bool,
    device: str,
    dtype: str,
    trust_remote_code: bool = False,
) -> None:
    """``--tasks``: each model in turn through lm-evaluation-harness, then one table."""
    from llmkit.evaluation.harness import evaluate_tasks, require_harness

    require_harness()  # before anything else: one line naming the extra
    results = []
    for name in models:
        result = evaluate_tasks(
            name,
            tasks,
            include_path=include_path or None,
            limit=limit,
            num_fewshot=num_fewshot,
            batch_size=batch_size,
            max_length=max_length,
            chat=chat,
            device=device,
            dtype=dtype,
            trust_remote_code=trust_remote_code,
        )
        results.append(result)
        if json_out:
            typer.echo(json.dumps(result))
    if not json_out:
        from llmkit.core.console import make_console

        make_console().print(tasks_table(results))


def register(app: typer.Typer) -> None:
    """Add the ``eval`` command to ``app``."""
    app.command("eval")(eval_command)
