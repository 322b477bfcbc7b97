"""`python -m megatune.argmap.table` prints the swift -> Megatron table (Markdown) that README.md embeds.

A test keeps README.md's copy (between the `<!-- argmap-table -->` markers) equal to `markdown_table()`.
"""

from __future__ import annotations

from .mapping import TABLE

BEGIN, END = "<!-- argmap-table:begin -->", "<!-- argmap-table:end -->"


def markdown_table() -> str:
    lines = ["| swift (`SftArguments`) | Megatron-LM | rule | read back |", "|---|---|---|---|"]
    for rule in TABLE:
        sft = ", ".join(f"`{name}`" for name in rule.sft) or "—"
        back = "yes" if rule.backward is not None else "—"
        lines.append(f"| {sft} | `{rule.megatron}` | {rule.rule} | {back} |")
    return "\n".join(lines)


def main() -> None:
    print(markdown_table())


if __name__ == "__main__":
    main()
