"""Shared result output: the JSON file every benchmark writes and its markdown table."""
import json
from pathlib import Path


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """A markdown table, first column left-aligned, the others right-aligned."""
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def save_and_print(results: dict, path: Path, header: list[str], rows: list[list[str]]):
    """Write results as JSON to path and print rows as a markdown table (first column left-aligned)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2))
    print("\n" + markdown_table(header, rows))
