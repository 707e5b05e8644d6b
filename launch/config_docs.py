"""Print the Markdown config reference, generated from the config dataclasses' field docstrings.

examples:
    python -m launch.config_docs                 # every key of TrainConfig: dotted key, type, default, doc
    python -m launch.config_docs --metrics       # also the per-step metrics table
    python -m launch.config_docs -o docs/config.md

One table per top-level section (``run``, ``data``, ``model``, ...). Defaults are those of ``TrainConfig()``
(the real 8×H100 values; ``configs/tiny_cpu.yaml`` overrides some). Sibling sections of the same type (the reward
experts under ``serve``) are listed once as ``serve.<expert>.*``. Any YAML key can also be set on the command
line as ``key.sub=value``.
"""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import sys
import typing
from typing import Any

from configs.loader import field_docs, walk_dataclasses

_MISSING = object()


def type_name(tp: Any) -> str:
    """Readable annotation: ``int``, ``str | None``, ``list[str]``, ``dict[str, float]``, a dataclass name."""
    if isinstance(tp, type) and not typing.get_args(tp):
        return tp.__name__
    return str(tp).replace("typing.", "").replace("NoneType", "None")


def format_default(value: Any) -> str:
    """A default value as it would be written in YAML (flow style, short)."""
    if value is _MISSING:
        return "—"
    if dataclasses.is_dataclass(value):
        return "(section)"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"' if value == "" else value
    if isinstance(value, tuple):
        value = list(value)
    text = str(value).replace("'", "")
    return text if len(text) <= 60 else text[:57] + "..."


def _lookup(root: Any, dotted: str) -> Any:
    obj = root
    for part in dotted.split("."):
        if part == "<name>" or obj is _MISSING:
            return _MISSING
        obj = getattr(obj, part, _MISSING)
    return obj


def _class_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return _MISSING


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def config_rows(root_cls: type | None = None) -> list[tuple[str, str, str, str]]:
    """(dotted key, type, default, doc) for every config field; repeated sibling sections collapsed."""
    if root_cls is None:
        from configs.schema import TrainConfig

        root_cls = TrainConfig
    root = root_cls()
    hints_cache: dict[type, dict] = {}
    docs_cache: dict[type, dict] = {}
    # sibling sections of one dataclass type (serve.tier, serve.ber, ...) -> documented once as parent.<expert>
    groups: dict[tuple[str, type], list[str]] = {}
    for key, cls, f in walk_dataclasses(root_cls):
        tp = hints_cache.setdefault(cls, typing.get_type_hints(cls))[f.name]
        if dataclasses.is_dataclass(tp):
            parent = key.rsplit(".", 1)[0] if "." in key else ""
            groups.setdefault((parent, tp), []).append(key)
    alias: dict[str, str] = {}
    for (parent, tp), keys in groups.items():
        if len(keys) > 1:
            stem = f"{parent}.<{'expert' if parent.endswith('serve') else 'name'}>" if parent else "<name>"
            for i, k in enumerate(keys):
                alias[k] = stem if i == 0 else ""   # "" = skip the repeats
    rows = []
    for key, cls, f in walk_dataclasses(root_cls):
        shown = key
        skip = False
        for original, stem in alias.items():
            if key == original or key.startswith(original + "."):
                if not stem:
                    skip = True
                shown = (stem or original) + key[len(original):]
                break
        if skip:
            continue
        tp = hints_cache.setdefault(cls, typing.get_type_hints(cls))[f.name]
        doc = docs_cache.setdefault(cls, field_docs(cls)).get(f.name, "")
        value = _lookup(root, key) if shown == key else _class_default(f)
        if shown != key and dataclasses.is_dataclass(tp) and key in alias:
            names = [k.rsplit(".", 1)[1] for k in groups[(key.rsplit(".", 1)[0], tp)]]
            doc = f"One section per {shown.rsplit('.', 1)[1][1:-1]}: {', '.join(names)}. " + \
                _cell(inspect.getdoc(tp) or "")
        rows.append((shown, type_name(tp), format_default(value), _cell(doc)))
    return rows


def config_markdown(root_cls: type | None = None) -> str:
    """The whole reference: one heading + table per top-level section."""
    if root_cls is None:
        from configs.schema import TrainConfig

        root_cls = TrainConfig
    sections: dict[str, list] = {}
    for row in config_rows(root_cls):
        sections.setdefault(row[0].split(".", 1)[0], []).append(row)
    docs = field_docs(root_cls)
    hints = typing.get_type_hints(root_cls)
    out = []
    for name, rows in sections.items():
        out.append(f"### `{name}`\n")
        summary = docs.get(name) or inspect.getdoc(hints[name]) or ""
        if summary:
            out.append(_cell(summary) + "\n")
        out.append("| key | type | default | description |")
        out.append("|---|---|---|---|")
        for key, tp, default, doc in rows:
            if key == name:
                continue
            out.append(f"| `{key}` | `{_cell(tp)}` | `{_cell(default)}` | {doc} |")
        out.append("")
    return "\n".join(out)


def metrics_markdown() -> str:
    """The per-step metrics table (JSONL / TensorBoard key, Ray metric name, meaning)."""
    from actors.telemetry.prometheus import metric_name
    from actors.telemetry.step_metrics import METRIC_DOCS

    out = ["### Per-step metrics\n", "| key | Prometheus name | meaning |", "|---|---|---|"]
    for key, doc in METRIC_DOCS.items():
        name = metric_name("grpo", key.replace("<expert>", "EXPERT")).replace("EXPERT", "<expert>")
        exported = "–" if key == "concepts" else f"`ray_{name}`"   # text: job log, JSONL and trackers only
        out.append(f"| `{key}` | {exported} | {_cell(doc)} |")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    """CLI entrypoint: print (or write) the Markdown reference."""
    parser = argparse.ArgumentParser(prog="python -m launch.config_docs", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--metrics", action="store_true", help="append the per-step metrics table")
    parser.add_argument("-o", "--output", default=None, help="write to this file instead of stdout")
    args = parser.parse_args(argv)
    text = config_markdown()
    if args.metrics:
        text += "\n" + metrics_markdown()
    if args.output:
        with open(args.output, "w") as fh:
            fh.write(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
