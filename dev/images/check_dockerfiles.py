#!/usr/bin/env python3
"""Fails when a Dockerfile in deploy/ and the image description in dev/images/ that names it say
different things about the image: the binaries it holds and where, the user, the entrypoint and
the environment. The local cluster runs the images built from the descriptions; users build the
Dockerfiles; this keeps the two one image.

A description names its Dockerfile with a comment line `# dockerfile: deploy/Dockerfile...`.
`make test` runs this (make check-images).
"""

import json
import pathlib
import re
import shlex
import sys

root = pathlib.Path(__file__).resolve().parents[2]


BINARY_DIRS = ("/usr/local/bin/", "/usr/bin/", "/usr/sbin/", "/bin/", "/sbin/")


def is_binary(path):
    """Binaries are compared wherever they come from; other files (CA certificates, which a
    Dockerfile's base image brings) are not."""
    return path.startswith(BINARY_DIRS)


def description(path):
    image = {"files": set(), "user": None, "entrypoint": None, "env": {}, "dockerfile": None}
    for raw in path.read_text().splitlines():
        match = re.match(r"#\s*dockerfile:\s*(\S+)", raw.strip())
        if match:
            image["dockerfile"] = match.group(1)
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        verb, *args = line.split()
        if verb == "file" and (args[0].startswith("@release@/") or is_binary(args[1])):
            image["files"].add(args[1])
        elif verb == "user":
            image["user"] = args[0]
        elif verb == "entrypoint":
            image["entrypoint"] = args
        elif verb == "env":
            key, value = args[0].split("=", 1)
            image["env"][key] = value
    return image


def dockerfile(path):
    """What the final stage of a multi-stage Dockerfile puts in the image."""
    lines, current = [], ""
    for raw in path.read_text().splitlines():
        stripped = raw.strip()
        if stripped.startswith("#"):
            continue
        current += " " + stripped.rstrip("\\")
        if not stripped.endswith("\\"):
            lines.append(current.strip())
            current = ""
    stages = [[]]
    for line in lines:
        if line.upper().startswith("FROM "):
            stages.append([])
        stages[-1].append(line)
    image = {"files": set(), "user": None, "entrypoint": None, "env": {}}
    for line in stages[-1]:
        verb, _, rest = line.partition(" ")
        verb = verb.upper()
        if verb == "COPY":
            words = [w for w in shlex.split(rest) if not w.startswith("--")]
            *sources, destination = words
            for source in sources:
                # A directory tree copied whole is a binary's shared libraries (the description's
                # `libs` lines), which the host's ldd decides there.
                if source.endswith("/"):
                    continue
                target = destination + pathlib.PurePosixPath(source).name if destination.endswith("/") else destination
                image["files"].add(target)
        elif verb == "USER":
            image["user"] = rest.strip()
        elif verb == "ENTRYPOINT":
            image["entrypoint"] = json.loads(rest)
        elif verb == "ENV":
            key, value = rest.strip().split("=", 1)
            image["env"][key] = value
    return image


failures = 0
for path in sorted((root / "dev/images").glob("*.image")):
    wanted = description(path)
    if not wanted["dockerfile"]:
        continue
    built = dockerfile(root / wanted["dockerfile"])
    for field in ("files", "user", "entrypoint", "env"):
        if wanted[field] != built[field]:
            failures += 1
            print(f"{path.relative_to(root)} and {wanted['dockerfile']} differ in {field}: "
                  f"{sorted(wanted[field]) if field == 'files' else wanted[field]} vs "
                  f"{sorted(built[field]) if field == 'files' else built[field]}", file=sys.stderr)
if failures:
    print("make the image description and its Dockerfile say the same", file=sys.stderr)
    sys.exit(1)
