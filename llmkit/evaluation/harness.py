"""Benchmarks from lm-evaluation-harness through its Python API (SPEC §5), the optional extra
``pip install 'llmkit[eval]'``.

The model is loaded once by llmkit (:func:`llmkit.core.loading.load_model_and_tokenizer`:
a run, a ``save_pretrained`` directory, a ``.gguf`` file or a Hub id) and handed, already
loaded, to the harness's ``HFLM`` wrapper; ``lm_eval.simple_evaluate`` then runs the tasks.
Nothing is loaded twice and no model code is fetched. Two departures from ``HFLM`` on
purpose (:func:`harness_lm`): perplexity (rolling) requests get one start token, as
``llmkit eval`` scores them, whatever the tokenizer adds (lm-evaluation-harness #3333); a
token spanning the context/continuation join is scored with the continuation encoded alone
and counted in a warning (#1297) instead of failing the run.

Tasks are named as in the harness (``hellaswag``, ``arc_easy``, a group such as ``mmlu``) or
defined by YAML files under ``include_path`` directories (the harness's own task format; see
``examples/eval_tasks/`` for a local multiple-choice task). Names found in the include paths
are looked up without indexing the harness's ~15,000 built-in tasks (which takes tens of
seconds); other names need that index.

One difference from the harness alone: in a task YAML under an include path, a relative local
``dataset_kwargs.data_files`` (or ``dataset_path``) that exists next to the YAML is read from
there, whatever the working directory (the harness resolves it against the working
directory), so a task directory works from anywhere. Hub tasks need the Hub (or its local
cache); offline, their data cannot be loaded and the error says so.

Code: a task YAML may name Python functions (``!function utils.process_docs``, ``class:
!function ...``) that the harness imports from a ``.py`` file next to it. The harness's own
built-in tasks do so freely (that code is part of the installed package); a task under an
``include_path`` may only with ``trust_remote_code=True`` (``--trust-remote-code``): otherwise
it is refused with one line before any of its code is imported (:func:`task_code_guard`).
A metric is code too: for a ``metric_list`` name the harness does not register itself (a
``.py`` path, or any other name), and in some built-in tasks' own modules (HumanEval's and
MBPP's ``code_eval``, SQuAD v2...), the harness calls ``evaluate.load(name)``, which imports a
Python script: a ``.py`` path, ``./NAME/NAME.py`` under the working directory, or a script
fetched from the Hub. While tasks are built and evaluated, ``evaluate``'s module factory is
guarded, so without ``trust_remote_code`` every such load is refused with one line naming the
task and the metric, whatever the working directory (fail closed: ``evaluate`` has no metric
that loads without a script). The harness's registered metrics (``acc``, ``acc_norm``,
``exact_match``, ``bleu``...) are plain functions of the installed package and unaffected.
``datasets`` (>= 4) runs no dataset loading scripts at all, so a task's ``dataset_path``
cannot name code.
Tasks that execute what the model writes (the harness marks them ``unsafe_code``, e.g.
HumanEval, MBPP) are never run: such a task (or a group or tag holding one) is refused by
name from the harness's task index before any of its modules is imported, and
``confirm_run_unsafe_code`` stays False as a second line of defence.

Source: EleutherAI lm-evaluation-harness (Gao et al., "A framework for few-shot language
model evaluation", Zenodo 10256836), ``lm_eval.evaluator.simple_evaluate`` and
``lm_eval.models.huggingface.HFLM``.
"""

from __future__ import annotations

import difflib
import importlib.abc
import logging
import os
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stdout
from pathlib import Path
from typing import Any

from llmkit.errors import UserError, require

INSTALL_HINT = "pip install 'llmkit[eval]'"


def require_harness() -> None:
    """Raise when lm-evaluation-harness is not installed.

    Raises:
        UserError: ``lm_eval`` cannot be imported; the hint names the extra to install.
    """
    require("lm_eval", "--tasks needs lm-evaluation-harness", INSTALL_HINT)


def parse_tasks(tasks: str | list[str]) -> list[str]:
    """Task names from ``"hellaswag,arc_easy"`` or a list of such strings, in order, without
    repeats or blanks.

    Raises:
        UserError: no task name at all.
    """
    items = [tasks] if isinstance(tasks, str) else list(tasks)
    names = [n.strip() for item in items for n in str(item).split(",") if n.strip()]
    if not names:
        raise UserError("--tasks names no task", "e.g. --tasks hellaswag,arc_easy")
    return list(dict.fromkeys(names))


class TaskCodeRefused(Exception):
    """A task outside the harness's package names Python code and it is not trusted."""

    def __init__(self, qual: str, base_dir: Path):
        super().__init__(qual)
        self.qual, self.base_dir = qual, base_dir


class MetricCodeRefused(BaseException):
    """The harness asked ``evaluate`` to load a metric (Python code) and code is not trusted.

    A ``BaseException`` on purpose: the harness's ``get_metric`` catches ``Exception``, logs
    and goes on without the metric; this must reach llmkit instead.
    """

    def __init__(self, metric: str, task: str | None):
        super().__init__(metric)
        self.metric, self.task = metric, task


# the modules of ``evaluate`` that hold a reference to ``evaluation_module_factory``
_EVALUATE_FACTORY_HOLDERS = ("evaluate.loading", "evaluate.inspect", "evaluate.evaluation_suite")


def _task_in_stack() -> str | None:
    """The name of the harness Task being built or evaluated by a caller up the stack, if
    any (its ``self.config.task``)."""
    frame = sys._getframe(2)
    while frame is not None:
        obj = frame.f_locals.get("self")
        name = getattr(getattr(obj, "config", None), "task", None)
        if isinstance(name, str) and type(obj).__module__.startswith("lm_eval"):
            return name
        frame = frame.f_back
    return None


class _EvaluateGuard(importlib.abc.MetaPathFinder):
    """While installed, refuses ``evaluate``'s module loading: ``evaluate.load``,
    ``evaluate.combine`` and ``EvaluationSuite.load`` all go through
    ``evaluate.loading.evaluation_module_factory`` (evaluate 0.4). ``evaluate`` is patched now
    if already imported, else the moment it is imported (this meta path finder), so a run that
    never needs it does not pay for importing it."""

    def __init__(self) -> None:
        self.refused: list[MetricCodeRefused] = []
        self.original: Any = None
        self.factory = self.guarded  # one bound method, so that ``is`` finds it again

    def guarded(self, path: Any, *args: Any, **kwargs: Any) -> Any:
        err = MetricCodeRefused(str(path), _task_in_stack())
        self.refused.append(err)
        raise err

    def patch(self, module: Any) -> None:
        current = getattr(module, "evaluation_module_factory", None)
        if module.__name__ == "evaluate.loading":
            if current is None:  # fail closed: nothing we know how to guard
                raise UserError(
                    "this evaluate release loads metrics in a way llmkit does not know (no "
                    "evaluate.loading.evaluation_module_factory), so llmkit cannot keep a "
                    "metric's Python code from running",
                    "install a tested release (pip install 'evaluate>=0.4,<0.5') or pass "
                    "--trust-remote-code",
                )
            if current is not self.factory:
                self.original = current
        if current is not None:
            module.evaluation_module_factory = self.factory

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname not in _EVALUATE_FACTORY_HOLDERS:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None and spec.loader is not None:
                spec.loader = _PatchingLoader(spec.loader, self)
                return spec
        return None

    def install(self) -> None:
        sys.meta_path.insert(0, self)
        for name in _EVALUATE_FACTORY_HOLDERS:  # evaluate.loading first
            if name in sys.modules:
                self.patch(sys.modules[name])

    def uninstall(self) -> None:
        if self in sys.meta_path:
            sys.meta_path.remove(self)
        if self.original is None:
            return
        for name in _EVALUATE_FACTORY_HOLDERS:
            module = sys.modules.get(name)
            if getattr(module, "evaluation_module_factory", None) is self.factory:
                module.evaluation_module_factory = self.original


class _PatchingLoader(importlib.abc.Loader):
    """Runs a module of ``evaluate`` with its own loader, then guards it."""

    def __init__(self, loader: Any, guard: _EvaluateGuard):
        self.loader, self.guard = loader, guard

    def create_module(self, spec: Any) -> Any:
        return self.loader.create_module(spec)

    def exec_module(self, module: Any) -> None:
        self.loader.exec_module(module)
        self.guard.patch(module)

    def __getattr__(self, name: str) -> Any:  # get_resource_reader, is_package...
        return getattr(self.loader, name)


@contextmanager
def task_code_guard(trust_remote_code: bool) -> Iterator[list[MetricCodeRefused]]:
    """Within the block, a task YAML outside the installed harness may not import Python code
    (its ``!function`` references) unless ``trust_remote_code``.

    The harness resolves every ``!function`` through ``lm_eval.tasks._yaml_loader.
    _import_func_in_yml(qual, base_dir)`` (0.4.10+); it is wrapped so that a reference from a
    YAML whose directory is not inside the ``lm_eval`` package raises :class:`TaskCodeRefused`
    before anything is imported. This covers YAMLs reached through ``include:`` too.

    Metrics are guarded in the same block (:class:`_EvaluateGuard`): any
    ``evaluate.load(name)`` (a task's metric the harness does not register, or a call in a
    task's own module) raises :class:`MetricCodeRefused`, whatever ``name`` is and whatever
    the working directory; the list yielded records each refusal, so a caller can refuse
    even if some code swallowed the exception.

    Raises:
        UserError: the harness or ``evaluate`` resolves code in a way llmkit cannot guard.
    """
    if trust_remote_code:
        yield []
        return
    from llmkit.core.compat import lm_eval_import_func, set_lm_eval_import_func

    original = lm_eval_import_func()
    if original is None:  # fail closed: a harness whose loader we cannot guard runs no task
        raise UserError(
            "this lm_eval release resolves task code in a way llmkit does not know "
            "(no lm_eval.tasks._yaml_loader._import_func_in_yml), so llmkit cannot keep a "
            "task's Python code from running",
            "install a tested release (pip install 'lm_eval>=0.4.13,<0.5') or pass "
            "--trust-remote-code",
        )
    import lm_eval

    package = Path(lm_eval.__file__).resolve().parent

    def guarded(qual: str, base_dir: Path):
        if not Path(base_dir).resolve().is_relative_to(package):
            raise TaskCodeRefused(qual, Path(base_dir))
        return original(qual, base_dir)

    metrics = _EvaluateGuard()
    set_lm_eval_import_func(guarded)
    try:
        metrics.install()
        yield metrics.refused
    finally:
        metrics.uninstall()
        set_lm_eval_import_func(original)


def _metric_code_error(err: MetricCodeRefused, task: str | None = None) -> UserError:
    who = err.task or task
    return UserError(
        f"{f'task {who!r}' if who else 'a task'} uses metric {err.metric!r}, which the harness "
        "would load with evaluate.load: that imports Python code (a .py path, ./NAME/NAME.py "
        "under the working directory, or a script from the Hub), and llmkit does not run a "
        "task's code unless told to",
        "pass --trust-remote-code (Python: trust_remote_code=True) only if you trust the "
        "task and that metric's code",
    )


def _unsafe_error(name: str) -> UserError:
    return UserError(
        f"task {name} executes the code the model writes (lm-evaluation-harness marks it "
        "unsafe); llmkit does not run such tasks",
        "run it with lm-eval itself in a sandbox",
    )


def unsafe_task(tm: Any, name: str, _seen: set[str] | None = None) -> str | None:
    """The first task reached from ``name`` (a task, group or tag) whose config says
    ``unsafe_code``, read from the harness's task index (YAML parsed without importing any
    of the tasks' code); None when there is none or the index has no such entry."""
    seen = set() if _seen is None else _seen
    if name in seen:
        return None
    seen.add(name)
    entry = (getattr(tm, "task_index", None) or {}).get(name)
    if entry is None:
        return None
    kind = getattr(getattr(entry, "kind", None), "name", "")
    cfg = getattr(entry, "cfg", None) or {}
    if kind in ("TASK", "PY_TASK"):
        return name if cfg.get("unsafe_code") else None
    if kind == "TAG":
        return _unsafe_child(tm, sorted(getattr(entry, "tags", None) or ()), seen, name)
    return _unsafe_child(tm, cfg.get("task"), seen, name)


def _unsafe_child(tm: Any, children: Any, seen: set[str], parent: str) -> str | None:
    """:func:`unsafe_task` over a group's ``task`` list: names, task dicts (a name with
    overrides) and inline group dicts."""
    for child in children if isinstance(children, list) else [children]:
        found = None
        if isinstance(child, str):
            found = unsafe_task(tm, child, seen)
        elif isinstance(child, dict):
            if child.get("unsafe_code"):
                return str(child.get("task") or child.get("group") or parent)
            if "group" in child:
                found = _unsafe_child(tm, child.get("task"), seen, str(child["group"]))
            elif isinstance(child.get("task"), str):
                found = unsafe_task(tm, child["task"], seen)
        if found:
            return found
    return None


def _task_code_error(name: str, err: TaskCodeRefused) -> UserError:
    return UserError(
        f"task {name!r} ({err.base_dir}) names Python code of its own (!function {err.qual}) "
        "that the harness would import, and llmkit does not run a task's code unless told to",
        "pass --trust-remote-code (Python: trust_remote_code=True) only if you trust the "
        "task's author",
    )


def _refused(err: BaseException) -> TaskCodeRefused | None:
    """The :class:`TaskCodeRefused` in ``err``'s chain of causes, if any (the harness may
    wrap it)."""
    seen = 0
    while err is not None and seen < 20:
        if isinstance(err, TaskCodeRefused):
            return err
        err = err.__cause__ or err.__context__
        seen += 1
    return None


def _quiet_harness_logs() -> None:
    """The harness logs at INFO/WARNING on every run (e.g. that a loaded model was passed in);
    keep its errors only, unless ``LLMKIT_DEBUG`` is set."""
    if os.environ.get("LLMKIT_DEBUG", "") in ("", "0"):
        logging.getLogger("lm_eval").setLevel(logging.ERROR)


def _include_paths(include_path: str | Path | list | None) -> list[Path]:
    """The include paths as absolute directories.

    The harness's ``TaskManager`` indexes the ``*.yaml`` files under each include path
    (``TaskIndex._iter_yaml_files``, lm-eval 0.4.13: ``root.glob("**/*.yaml")``), so a file
    given there adds nothing and its task was then reported as unknown.

    Raises:
        UserError: a path that does not exist, or that is not a directory.
    """
    if include_path is None:
        return []
    items = [include_path] if isinstance(include_path, (str, Path)) else list(include_path)
    paths = []
    for item in items:
        p = Path(item).expanduser()
        if not p.exists():
            raise UserError(
                f"--include-path {item} does not exist",
                "give a directory of lm-evaluation-harness task YAMLs",
            )
        if not p.is_dir():
            raise UserError(
                f"--include-path {item} is a file: it takes a directory, whose task YAMLs "
                "(in it and below) are added",
                f"give the directory that holds it: --include-path {p.parent}",
            )
        paths.append(p.resolve())
    return paths


def task_manager(names: list[str], include_paths: list[Path]) -> Any:
    """An ``lm_eval.tasks.TaskManager`` that knows every name in ``names``.

    The include paths alone are indexed first; the harness's built-in tasks are indexed only
    when a name is not found there (a YAML file path is accepted as a name too).

    Raises:
        UserError: a name that is neither a known task, group or tag nor a YAML file; the
            message lists the closest known names.
    """
    from lm_eval.tasks import TaskManager

    def missing(tm: Any) -> list[str]:
        known = set(tm.all_tasks)
        return [n for n in names if n not in known and not Path(n).is_file()]

    if include_paths:
        tm = TaskManager(include_path=[str(p) for p in include_paths], include_defaults=False)
        if not missing(tm):
            return tm
    tm = TaskManager(include_path=[str(p) for p in include_paths] or None)
    unknown = missing(tm)
    if unknown:
        name = unknown[0]
        close = difflib.get_close_matches(name, tm.all_tasks, n=3, cutoff=0.6)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise UserError(
            f"unknown lm-evaluation-harness task {name!r}",
            hint + "`lm-eval ls tasks` lists them; --include-path DIR adds your own YAML tasks",
        )
    return tm


def _local(value: Any, base: Path) -> Any:
    """``value`` (a path string, a list or a dict of them) with each relative path that exists
    under ``base`` made absolute; anything else unchanged."""
    if isinstance(value, str):
        if "://" in value or Path(value).is_absolute():
            return value
        candidate = base / value
        return str(candidate) if candidate.exists() else value
    if isinstance(value, list):
        return [_local(v, base) for v in value]
    if isinstance(value, dict):
        return {k: _local(v, base) for k, v in value.items()}
    return value


def task_specs(tm: Any, names: list[str], include_paths: list[Path]) -> list[str | dict]:
    """What to hand the harness for each name: the name itself, or, for a single task defined
    by a YAML under an include path, its full config with local data paths resolved against
    the YAML's directory (see the module docstring)."""
    from llmkit.core.compat import lm_eval_load_yaml

    load_yaml = lm_eval_load_yaml()  # the harness's YAML reader (0.4.10+)
    if load_yaml is None:  # another layout: names only, data paths as the harness reads them
        return list(names)
    specs: list[str | dict] = []
    for name in names:
        entry = tm.task_index.get(name)
        yaml_path = getattr(entry, "yaml_path", None)
        kind = getattr(getattr(entry, "kind", None), "name", "")
        inside = yaml_path is not None and any(
            Path(yaml_path).resolve().is_relative_to(p) for p in include_paths
        )
        if not inside or kind not in ("TASK", "PY_TASK"):
            specs.append(name)
            continue
        try:
            cfg = load_yaml(yaml_path, resolve_func=True)
        except TaskCodeRefused as err:
            raise _task_code_error(name, err) from None
        base = Path(yaml_path).resolve().parent
        if isinstance(cfg.get("dataset_kwargs"), dict) and "data_files" in cfg["dataset_kwargs"]:
            cfg["dataset_kwargs"] = {
                **cfg["dataset_kwargs"],
                "data_files": _local(cfg["dataset_kwargs"]["data_files"], base),
            }
        if isinstance(cfg.get("dataset_path"), str):  # "json" stays: no such file there
            cfg["dataset_path"] = _local(cfg["dataset_path"], base)
        for key in ("tag", "group"):
            cfg.pop(key, None)
        specs.append(cfg)
    return specs


def load_tasks(tm: Any, names: list[str], specs: list[str | dict]) -> list[Any]:
    """Build the harness's Task (and Group) objects, loading each task's data.

    Raises:
        UserError: a task whose data cannot be loaded (offline without a cached copy, a
            missing local file, a malformed config); the message names the task.
    """
    objects: list[Any] = []
    for name, spec in zip(names, specs, strict=True):
        unsafe = unsafe_task(tm, name)
        if unsafe is None and isinstance(spec, dict) and spec.get("unsafe_code"):
            unsafe = name
        if unsafe is not None:  # refused before any of its modules is imported
            raise _unsafe_error(unsafe)
    for name, spec in zip(names, specs, strict=True):
        try:
            loaded = tm.load([spec])
        except MetricCodeRefused as err:
            raise _metric_code_error(err, name) from None
        except Exception as err:  # datasets / hub / yaml errors of many types
            refused = _refused(err)
            if refused is not None:
                raise _task_code_error(name, refused) from None
            text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise UserError(
                f"cannot load lm-evaluation-harness task {name!r}: {text[:200]}",
                "Hub tasks need the network or a cached copy; for local data give "
                "--include-path DIR with a task YAML reading local files "
                "(see examples/eval_tasks)",
            ) from err
        if name in loaded["groups"]:
            objects.append(loaded["groups"][name])
        else:
            objects.extend(loaded["tasks"].values())
    return objects


def _number(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None  # the harness writes "N/A" for a stderr it did not compute


def summarize(raw: dict[str, Any], *, samples: bool = False) -> dict[str, dict[str, Any]]:
    """llmkit's view of ``simple_evaluate``'s result: per task (and group) name,
    ``{"metrics": {name: {"value", "stderr"}}, "samples" (documents scored), "num_fewshot",
    "version", "higher_is_better": {name: bool}}`` and, with ``samples``, ``"docs"``: the
    harness's per-document records (its ``log_samples`` output).

    Metric names are the harness's, without its default filter (``acc,none`` → ``acc``;
    ``exact_match,strict-match`` stays as it is).
    """
    out: dict[str, dict[str, Any]] = {}
    sections = [("results", raw.get("results") or {}), ("groups", raw.get("groups") or {})]
    for _section, table in sections:
        for task, values in table.items():
            metrics: dict[str, dict[str, float | None]] = {}
            for key, value in values.items():
                if "," not in key or "_stderr," in key:
                    continue
                metric, filt = key.split(",", 1)
                name = metric if filt == "none" else key
                stderr = values.get(f"{metric}_stderr,{filt}")
                metrics[name] = {"value": _number(value), "stderr": _number(stderr)}
            n = (raw.get("n-samples") or {}).get(task, {})
            record: dict[str, Any] = {
                "metrics": metrics,
                "samples": n.get("effective", values.get("sample_len")),
                "num_fewshot": (raw.get("n-shot") or {}).get(task),
                "version": (raw.get("versions") or {}).get(task),
                "higher_is_better": (raw.get("higher_is_better") or {}).get(task, {}),
            }
            if samples and task in (raw.get("samples") or {}):
                record["docs"] = raw["samples"][task]
            out.setdefault(task, record)
    return out


def run_tasks(
    lm: Any,
    tokenizer: Any,
    tasks: str | list[str],
    *,
    include_path: str | Path | list | None = None,
    limit: int | None = None,
    num_fewshot: int | None = None,
    batch_size: int = 8,
    max_length: int | None = None,
    chat: bool = False,
    log_samples: bool = False,
    loaded_tasks: list[Any] | None = None,
    trust_remote_code: bool = False,
) -> dict[str, Any]:
    """Run lm-evaluation-harness tasks on an already loaded model.

    Args:
        lm: a ``transformers`` causal LM (in eval mode), wrapped as the harness's ``HFLM``.
        tokenizer: its tokenizer.
        tasks: task, group or tag names (``"hellaswag,arc_easy"`` or a list).
        include_path: directories of task YAMLs to add to the harness's.
        limit: score only the first ``limit`` documents of each task (None: all). The
            harness warns that such figures are for testing, not for reporting.
        num_fewshot: examples in each prompt (None: the task's default, else 0).
        batch_size: requests per forward pass.
        max_length: context in tokens (None: the model's positions).
        chat: render each request with the model's chat template (the harness's
            ``apply_chat_template``), for instruct and chat-tuned models.
        log_samples: keep the per-document records (``"docs"`` in each task's result).
        loaded_tasks: Task objects from :func:`load_tasks` (else they are loaded here).
        trust_remote_code: let a task under ``include_path`` import its Python functions
            (``!function``); False (default) refuses such a task (:func:`task_code_guard`).

    Returns:
        ``{"tasks": summarize(...), "limit", "lm_eval_version"}``.

    Raises:
        UserError: the extra is not installed; an unknown task; task data that cannot be
            loaded; ``limit`` < 1, ``num_fewshot`` < 0 or ``batch_size`` < 1; more few-shot
            examples than a task's few-shot split holds (:func:`check_fewshot`).
    """
    require_harness()
    _check_numbers(limit, num_fewshot, batch_size)
    _quiet_harness_logs()
    import lm_eval

    if loaded_tasks is None:
        loaded_tasks = _load_named_tasks(tasks, include_path, trust_remote_code)
    check_fewshot(loaded_tasks, num_fewshot)
    kwargs: dict[str, Any] = {"batch_size": batch_size}
    if max_length is not None:
        kwargs["max_length"] = max_length
    if chat:
        _check_chat_template(tokenizer)
    from llmkit.core.loading import silence_padding_warning

    # The harness pads on the right, after the scored continuation: the warning is noise.
    silence_padding_warning(lm)
    # the model is already loaded: nothing for the harness to fetch or run
    model = harness_lm(lm, tokenizer, trust_remote_code=False, **kwargs)
    raw = _simple_evaluate(
        model,
        loaded_tasks,
        limit=limit,
        num_fewshot=num_fewshot,
        log_samples=log_samples,
        chat=chat,
        trust_remote_code=trust_remote_code,
    )
    if model.split_joins:
        sys.stderr.write(
            f"warning: {model.split_joins} request(s) had a token spanning the join of context "
            "and continuation; each was scored with the continuation tokenized alone "
            "(lm-evaluation-harness #1297)\n"
        )
    return {
        "tasks": summarize(raw, samples=log_samples),
        "limit": limit,
        "lm_eval_version": getattr(lm_eval, "__version__", None),
    }


def _load_named_tasks(
    tasks: str | list[str], include_path: str | Path | list | None, trust_remote_code: bool
) -> list[Any]:
    """The Task objects of ``tasks`` (names, with the YAMLs under ``include_path``), task
    code refused unless ``trust_remote_code`` (:func:`task_code_guard`).

    Raises:
        UserError: an unknown task; task data that cannot be loaded; task code refused.
    """
    names = parse_tasks(tasks)
    paths = _include_paths(include_path)
    tm = task_manager(names, paths)
    with task_code_guard(trust_remote_code) as refused:
        loaded = load_tasks(tm, names, task_specs(tm, names, paths))
        if refused:  # some code swallowed the refusal: refuse all the same
            raise _metric_code_error(refused[0])
    return loaded


def _check_chat_template(tokenizer: Any) -> None:
    """Render one user turn with ``tokenizer``'s chat template, so that ``--chat`` with no
    template or a broken one fails here in one line, not inside the harness.

    Raises:
        UserError: the tokenizer has no chat template, or it does not render.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise UserError(
            "--chat needs a chat template and the model's tokenizer has none (not a chat model)",
            "drop --chat, or evaluate an instruct model",
        )
    from llmkit.templates import render_chat

    render_chat(tokenizer, [{"role": "user", "content": "Hi"}], add_generation_prompt=True)


def _simple_evaluate(
    model: Any,
    loaded_tasks: list[Any],
    *,
    limit: int | None,
    num_fewshot: int | None,
    log_samples: bool,
    chat: bool,
    trust_remote_code: bool,
) -> dict[str, Any]:
    """``lm_eval.simple_evaluate`` on built tasks: its progress notes on stderr (stdout is
    for llmkit's results), metric code guarded while tasks are scored, tasks that execute
    the model's code refused.

    Raises:
        UserError: metric code refused; a task marked unsafe.
    """
    import lm_eval
    from lm_eval.tasks import TaskManager

    # The tasks are built already; without a manager of its own, simple_evaluate would index
    # all ~15,000 built-in tasks again (tens of seconds) only to pass them through.
    empty_manager = TaskManager(include_defaults=False)
    try:
        # a metric a task loads while it is scored (e.g. in process_results) is guarded too
        # the harness prints progress notes on stdout ("bootstrapping for stddev: ...");
        # stdout is for llmkit's results (--json: one JSON object), so they go to stderr
        with task_code_guard(trust_remote_code) as refused, redirect_stdout(sys.stderr):
            raw = lm_eval.simple_evaluate(
                model=model,
                tasks=loaded_tasks,
                limit=limit,
                num_fewshot=num_fewshot,
                log_samples=log_samples,
                apply_chat_template=chat,
                task_manager=empty_manager,
                # tasks that execute the code the model writes (HumanEval...): never
                confirm_run_unsafe_code=False,
            )
            if refused:  # some code swallowed the refusal: refuse all the same
                raise _metric_code_error(refused[0])
    except MetricCodeRefused as err:
        raise _metric_code_error(err) from None
    except ValueError as err:
        if "Sample larger than population" in str(err):
            # check_fewshot bounds the shots beforehand; the harness also leaves out every
            # copy of the scored document when drawing from its own split (duplicate rows)
            raise UserError(
                f"--num-fewshot {num_fewshot} is more than a task's few-shot documents hold "
                "once the scored document's duplicates are left out",
                "lower --num-fewshot",
            ) from None
        if "marked as unsafe" not in str(err):
            raise
        found = re.search(r"task:? (\S+) which is marked as unsafe", str(err))
        raise _unsafe_error(found.group(1) if found else "a task") from None
    return raw


def harness_lm(lm: Any, tokenizer: Any, **kwargs: Any) -> Any:
    """The harness's ``HFLM`` around an already loaded model, with two departures from
    lm-evaluation-harness 0.4.13 (both pinned by tests/evaluation/test_eval_harness.py):

    - **One start token on the perplexity path.** ``loglikelihood_rolling`` (perplexity tasks
      such as wikitext) puts ``prefix_token_id`` (BOS, else EOS) in front of
      ``tok_encode(text)``, and ``tok_encode`` lets the tokenizer add its special tokens: a
      tokenizer whose post-processor adds BOS (Llama, Gemma...) gave two BOS
      (EleutherAI/lm-evaluation-harness #3333), and one that appends EOS a scored EOS. Here the
      document is encoded without special tokens on that path, so the model sees exactly the
      input ``llmkit eval`` scores: one BOS (else EOS), then the text's tokens.
    - **A token spanning the context/continuation join.** For ``loglikelihood`` the harness
      encodes context + continuation together and cuts at ``len(encode(context))``
      (``TemplateLM._encode_pair``); when a token spans the join ("hello wor" + "ld" with a
      vocabulary holding "Ġworld") the cut leaves no continuation and the run dies on
      ``assert len(continuation_enc) > 0`` (#1297, PR #4055), or leaves a continuation that
      is not the continuation's text. Rule here: when the joint encoding does not begin with
      the context's own tokens, the continuation is encoded alone (without special tokens)
      after the context's tokens, as PR #4055 proposes; such requests are counted in
      ``split_joins`` (``run_tasks`` warns with the count). A continuation with no tokens at
      all (an empty target) is a UserError naming the request.

    Both override methods of the harness's ``HFLM``/``TemplateLM``; ``_encode_pair`` is
    private API (lm_eval 0.4.13; see PR #4055 and issue #1297 before upgrading).
    """
    from lm_eval.models.huggingface import HFLM

    class LlmkitHFLM(HFLM):
        split_joins = 0
        _plain_encoding = False

        def loglikelihood_rolling(self, requests: Any, disable_tqdm: bool = False) -> Any:
            # lm_eval 0.4.13 encodes each document with self.tok_encode(text) here and puts
            # prefix_token_id in front (lm-evaluation-harness #3333): no special tokens of
            # the tokenizer's own on this path
            self._plain_encoding = True
            try:
                return super().loglikelihood_rolling(requests, disable_tqdm=disable_tqdm)
            finally:
                self._plain_encoding = False

        def tok_encode(
            self, string: str, add_special_tokens: bool | None = None, **kw: Any
        ) -> list[int]:
            if self._plain_encoding and add_special_tokens is None:
                add_special_tokens = False
            return super().tok_encode(string, add_special_tokens=add_special_tokens, **kw)

        def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
            # private API of lm_eval 0.4.13 (TemplateLM._encode_pair), called by
            # TemplateLM.loglikelihood for a non-empty context; PR #4055 / issue #1297
            if self.backend != "causal":
                return super()._encode_pair(context, continuation)
            spaces = len(context) - len(context.rstrip())
            if spaces:  # as the harness does: trailing spaces go with the continuation
                context, continuation = context[:-spaces], context[-spaces:] + continuation
            whole = self.tok_encode(context + continuation)
            context_enc = self.tok_encode(context)
            if len(whole) > len(context_enc) and whole[: len(context_enc)] == context_enc:
                return context_enc, whole[len(context_enc) :]
            self.split_joins += 1
            continuation_enc = self.tok_encode(continuation, add_special_tokens=False)
            if not continuation_enc:
                raise UserError(
                    f"a request's continuation {continuation!r} (after context "
                    f"{context[-40:]!r}) has no tokens, so it cannot be scored",
                    "check the task's doc_to_target / doc_to_choice",
                )
            return context_enc, continuation_enc

    return LlmkitHFLM(pretrained=lm, tokenizer=tokenizer, **kwargs)


def _leaf_tasks(objects: Any) -> list[Any]:
    """The Task objects in what :func:`load_tasks` returned (groups are nested dicts of
    their tasks and subgroups)."""
    if isinstance(objects, dict):
        return [t for value in objects.values() for t in _leaf_tasks(value)]
    if isinstance(objects, (list, tuple)):
        return [t for value in objects for t in _leaf_tasks(value)]
    return [objects] if hasattr(objects, "fewshot_docs") else []


def check_fewshot(loaded_tasks: Any, num_fewshot: int | None) -> None:
    """Refuse more few-shot examples than a task can draw, before anything is scored.

    The harness (lm_eval 0.4.13, ``api/samplers.py`` ``ContextSampler.sample``) draws the
    examples with ``random.sample`` from the task's few-shot documents (its
    ``fewshot_split``, else training, validation, then test documents), one more when that
    split is the evaluated one (the document scored is then left out): asking for more died
    in a ``ValueError: Sample larger than population`` traceback. The shots per task are
    ``num_fewshot`` (None: the task's own ``num_fewshot``; a task whose config says 0 keeps
    0, as ``simple_evaluate`` does).

    Args:
        loaded_tasks: what :func:`load_tasks` returned (tasks and groups).
        num_fewshot: ``--num-fewshot`` (None: each task's default).

    Raises:
        UserError: naming the task, the count asked for and the most it allows.
    """
    for task in _leaf_tasks(loaded_tasks):
        get = getattr(task, "get_config", None)
        default = get("num_fewshot") if get else None
        shots = default if num_fewshot is None or default == 0 else num_fewshot
        if not shots:
            continue
        sampler = getattr(task, "sampler", None)
        pool = sampler.fewshot_docs() if sampler is not None else task.fewshot_docs()
        size = len(pool) if pool is not None else 0
        split = getattr(getattr(task, "fewshot_cfg", None), "split", None)
        same = split is not None and split == (get("test_split") if get else None)
        most = max(size - 1, 0) if same else size
        if shots > most:
            name = get("task") if get else type(task).__name__
            source = "--num-fewshot" if num_fewshot is not None else "its num_fewshot"
            raise UserError(
                f"{source} {shots} is more than task {name!r} can draw: its few-shot "
                f"documents hold {size}" + (" (the scored one left out)" if same else ""),
                f"use --num-fewshot {most} or less",
            )


def _check_numbers(limit: int | None, num_fewshot: int | None, batch_size: int) -> None:
    if limit is not None and limit < 1:
        raise UserError(f"--limit {limit} must be at least 1", "or leave it out for all documents")
    if num_fewshot is not None and num_fewshot < 0:
        raise UserError(f"--num-fewshot {num_fewshot} is negative", "use 0 for zero-shot")
    if batch_size < 1:
        raise UserError(f"--batch-size {batch_size} must be at least 1")


def evaluate_tasks(
    model: str | None,
    tasks: str | list[str],
    *,
    include_path: str | Path | list | None = None,
    limit: int | None = None,
    num_fewshot: int | None = None,
    batch_size: int = 8,
    max_length: int | None = None,
    chat: bool = False,
    log_samples: bool = False,
    device: str = "auto",
    dtype: str = "auto",
    trust_remote_code: bool = False,
) -> dict[str, Any]:
    """Load a model once and run lm-evaluation-harness tasks on it (``llmkit eval --tasks``).

    The tasks (names checked, data loaded) are ready before the model loads, so a bad task
    name or unreachable data fails fast.

    Args:
        model: a run, ``save_pretrained`` directory, ``.gguf`` file or Hub id (None: the
            default search of :func:`llmkit.core.loading.load_model_and_tokenizer`).
        device, dtype: as for ``load_model_and_tokenizer``.
        trust_remote_code: let the model (``auto_map``) and the include-path tasks
            (``!function``) run Python code of their own; False (default) refuses them.
        Others: as for :func:`run_tasks`.

    Returns:
        ``{"model": source, "tasks": {name: {"metrics": {metric: {"value", "stderr"}},
        "samples", "num_fewshot", "version", "higher_is_better"}}, "limit",
        "lm_eval_version"}``.

    Raises:
        UserError: the extra is not installed (one line naming ``pip install 'llmkit[eval]'``);
            an unknown task or include path; task data that cannot be loaded; the model does
            not load; bad numbers.
    """
    from llmkit.core.loading import load_model_and_tokenizer, model_max_positions

    require_harness()
    _check_numbers(limit, num_fewshot, batch_size)
    _quiet_harness_logs()
    names = parse_tasks(tasks)
    paths = _include_paths(include_path)
    tm = task_manager(names, paths)
    with task_code_guard(trust_remote_code) as refused:
        loaded = load_tasks(tm, names, task_specs(tm, names, paths))
        if refused:  # some code swallowed the refusal: refuse all the same
            raise _metric_code_error(refused[0])
    check_fewshot(loaded, num_fewshot)  # before the model loads
    lm, tokenizer, source = load_model_and_tokenizer(
        model, device=device, dtype=dtype, trust_remote_code=trust_remote_code
    )
    from llmkit.runtime import announce_threads

    announce_threads()  # a busy machine's thread count (chosen by the CLI), said now
    positions = model_max_positions(lm)
    if max_length is not None and positions is not None and max_length > positions:
        raise UserError(
            f"--max-length {max_length} is more than the model's {positions} positions",
            f"use --max-length {positions} or less",
        )
    result = run_tasks(
        lm,
        tokenizer,
        names,
        limit=limit,
        num_fewshot=num_fewshot,
        batch_size=batch_size,
        max_length=max_length,
        chat=chat,
        log_samples=log_samples,
        loaded_tasks=loaded,
        trust_remote_code=trust_remote_code,
    )
    return {"model": source, **result}
