#!/usr/bin/env python3
"""Prints the values table of charts/rolemesh/README.md from charts/rolemesh/values.yaml, whose
`# -- ` comments are the one description of each value (the helm-docs convention). `make docs`
writes it between the README's markers; `make check-docs` fails when the committed table differs.
Run from the repository root: `dev/gen_chart_values.py` prints the table, `--write` updates the
README."""
import re
import sys

VALUES = "charts/rolemesh/values.yaml"
README = "charts/rolemesh/README.md"
BEGIN = "<!-- values table: generated from values.yaml by `make docs` -->"
END = "<!-- end of values table -->"
KEY = re.compile(r"^( *)([A-Za-z][A-Za-z0-9_]*):(?: (.*))?$")


def rows(lines):
    """(path, default, description) for every key that a `# -- ` comment documents."""
    out, path, doc = [], [], None
    for i, line in enumerate(lines):
        stripped = line.strip()
        if stripped.startswith("# -- "):
            doc = [stripped[5:]]
            continue
        if doc is not None and stripped.startswith("#"):
            doc.append(stripped.lstrip("#").strip())
            continue
        match = KEY.match(line)
        if not match:
            if stripped and not stripped.startswith("#") and not stripped.startswith("-"):
                doc = None
            continue
        indent, key, value = len(match.group(1)) // 2, match.group(2), (match.group(3) or "").strip()
        path = path[:indent] + [key]
        if doc is not None:
            if value:
                default = value.split(" #")[0]
            else:
                # A block value: the following lines, shown when short.
                block = []
                for nxt in lines[i + 1:]:
                    if nxt.strip() and (len(nxt) - len(nxt.lstrip())) // 2 <= indent:
                        break
                    if nxt.strip() and not nxt.strip().startswith("#"):
                        block.append(nxt.strip())
                default = "(see values.yaml)" if block else "{}"
            out.append((".".join(path), default, " ".join(doc)))
        doc = None
    return out


def table(lines):
    text = ["| Value | Default | Description |", "|---|---|---|"]
    for path, default, description in rows(lines):
        shown = default if default.startswith("(") else f"`{default}`"
        cell = description.replace("|", "\\|")
        text.append(f"| `{path}` | {shown} | {cell} |")
    return "\n".join(text) + "\n"


def main():
    with open(VALUES) as f:
        generated = table(f.read().splitlines())
    if "--write" not in sys.argv:
        sys.stdout.write(generated)
        return
    with open(README) as f:
        readme = f.read()
    if BEGIN not in readme or END not in readme:
        sys.exit(f"{README} lacks the markers {BEGIN!r} and {END!r}")
    head, rest = readme.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    with open(README, "w") as f:
        f.write(f"{head}{BEGIN}\n{generated}{END}{tail}")


if __name__ == "__main__":
    main()
