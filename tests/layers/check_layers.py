#!/usr/bin/env python3
"""The layer checker: each crate's modules stay in the layers docs/layers.toml declares.

    python3 tests/layers/check_layers.py [--map docs/layers.toml] [--root .] [--graph]

For every crate in the map it builds the module graph from the source tree: the modules are the
files (`a.rs` and `a/mod.rs` are `a`, `a/b.rs` is `a::b`), the edges are the paths that name
another module of the crate (`crate::a::..`, `super::..`, `self::..`, a `use crate::{a, b::c}`
group, and, in the crate root or a parent module, a bare `child::..`). Comments and string
literals do not count. A layer is a folder (`folder = "hooks"`: every module under
src/hooks/ is in it, and only there) or a list of modules (`modules = [...]`); a module belongs
to the layer whose folder holds it, else to the layer that lists it or, failing that, its
nearest listed parent module. Then it fails (exit 1) on

  - an import from a lower layer into a higher one that the map's allowlist does not name,
    printed as `file:line: upward import a -> b (layer x below y)`, with the rule;
  - a cycle between layers made by such imports, printed with the file:line of each edge;
  - a module that no layer lists (a new file must be placed in the map);
  - a module that a layer lists while it lives in another layer's folder.

It warns (exit 0) about allowlist entries that no import needs any more and map entries that
name no module. `--graph` prints every edge between modules, to read or to fill a map.
Standard library only (Python 3.11: tomllib).
"""
import argparse
import os
import re
import sys
import tomllib

IDENT = r"[A-Za-z_][A-Za-z0-9_]*"
RUST_KEYWORDS_NOT_MODULES = {"crate", "super", "self", "Self", "std", "core", "alloc"}


# ----------------------------------------------------------------------------- reading Rust

def blank_comments_and_strings(text):
    """The text with comments, string and char literals replaced by spaces (newlines kept, so
    line numbers stay right)."""
    out = []
    i, n = 0, len(text)

    def blank(s):
        return re.sub(r"[^\n]", " ", s)

    while i < n:
        c = text[i]
        if text.startswith("//", i):
            j = text.find("\n", i)
            j = n if j < 0 else j
            out.append(blank(text[i:j]))
            i = j
        elif text.startswith("/*", i):
            depth, j = 1, i + 2
            while j < n and depth:
                if text.startswith("/*", j):
                    depth, j = depth + 1, j + 2
                elif text.startswith("*/", j):
                    depth, j = depth - 1, j + 2
                else:
                    j += 1
            out.append(blank(text[i:j]))
            i = j
        elif re.match(r'b?r#*"', text[i:i + 260]) and (i == 0 or not (text[i - 1].isalnum() or text[i - 1] == "_")):
            m = re.match(r'(b?r)(#*)"', text[i:])
            close = '"' + m.group(2)
            j = text.find(close, i + m.end())
            j = n if j < 0 else j + len(close)
            out.append(blank(text[i:j]))
            i = j
        elif c == '"' or (c == "b" and text.startswith('b"', i) and (i == 0 or not text[i - 1].isalnum())):
            j = i + (2 if c == "b" else 1)
            while j < n and text[j] != '"':
                j += 2 if text[j] == "\\" else 1
            out.append(blank(text[i:j + 1]))
            i = j + 1
        elif c == "'":
            # a char literal ('a', '\n', '\u{1F600}') or a lifetime ('a): only the former is blanked
            m = re.match(r"'(\\(u\{[0-9A-Fa-f]+\}|x[0-9A-Fa-f]{2}|.)|[^\\'])'", text[i:])
            if m:
                out.append(blank(m.group(0)))
                i += m.end()
            else:
                out.append(c)
                i += 1
        else:
            out.append(c)
            i += 1
    return "".join(out)


def parse_group(code, pos):
    """Paths of a `{...}` use group starting at code[pos] == '{': (list of segment lists, end)."""
    paths, current, i = [], [], pos + 1
    while i < len(code):
        c = code[i]
        if c.isspace() or c == ":":
            i += 1
        elif c == "{":
            inner, i = parse_group(code, i)
            paths.extend(current + p for p in inner)
            current = None
        elif c == ",":
            if current:
                paths.append(current)
            current, i = [], i + 1
        elif c == "}":
            if current:
                paths.append(current)
            return paths, i + 1
        else:
            m = re.compile(IDENT + "|\\*").match(code, i)
            if not m:
                i += 1
                continue
            word = m.group(0)
            if word == "as":  # `x as y`: the alias is no module
                m2 = re.compile(r"\s*" + IDENT).match(code, m.end())
                i = m2.end() if m2 else m.end()
                continue
            if current is not None:
                current.append(word)
            i = m.end()
    return paths, i


def path_after(code, pos):
    """The segments of the path that starts at code[pos] (after `crate::` etc.): a list of
    segment lists (several for a `{...}` group)."""
    segs, i = [], pos
    while True:
        m = re.compile(r"\s*(" + IDENT + r")\s*(::)?").match(code, i)
        if m:
            segs.append(m.group(1))
            i = m.end()
            if not m.group(2):
                return [segs]
            continue
        m = re.compile(r"\s*\{").match(code, i)
        if m:
            inner, _ = parse_group(code, m.end() - 1)
            return [segs + p for p in inner]
        return [segs]


class Module:
    def __init__(self, name, path):
        self.name = name  # "a::b"; "" for the crate root
        self.path = path


def crate_modules(src):
    """{module name: Module} for every .rs file under src (the root is lib.rs or main.rs)."""
    mods = {}
    for dirpath, _dirs, files in os.walk(src):
        for f in sorted(files):
            if not f.endswith(".rs"):
                continue
            full = os.path.join(dirpath, f)
            rel = os.path.relpath(full, src)[:-3].split(os.sep)
            if rel in (["lib"], ["main"]):
                name = ""
            else:
                if rel[-1] == "mod":
                    rel = rel[:-1]
                name = "::".join(rel)
            mods[name] = Module(name, full)
    return mods


def inline_module_at(code):
    """For each offset of code, the inline `mod x { ... }` names it is inside: a function of
    the offset, built from one pass over the braces."""
    spans = []  # (start, end, name)
    stack = []  # (depth at open, name, start)
    depth = 0
    for m in re.finditer(r"\bmod\s+(" + IDENT + r")\s*\{|[{}]", code):
        tok = m.group(0)
        if tok.startswith("mod"):
            stack.append((depth, m.group(1), m.start()))
            depth += 1
        elif tok == "{":
            depth += 1
        else:
            depth -= 1
            if stack and stack[-1][0] == depth:
                d, name, start = stack.pop()
                spans.append((start, m.end(), name, d))

    def names(offset):
        inside = sorted((d, name) for s, e, name, d in spans if s <= offset < e)
        return [name for _d, name in inside]

    return names


def resolve(mods, segments):
    """The longest module name that `segments` starts with, or None."""
    for k in range(len(segments), 0, -1):
        name = "::".join(segments[:k])
        if name in mods:
            return name
    return None


def module_edges(mods):
    """(from module, to module, file, line) for every path that names another module."""
    edges = []
    for mod in mods.values():
        with open(mod.path, encoding="utf-8") as f:
            code = blank_comments_and_strings(f.read())
        line_at = [0]
        for ch in code:
            line_at.append(line_at[-1] + (ch == "\n"))
        inline = inline_module_at(code)
        own = mod.name.split("::") if mod.name else []
        seen = set()

        def add(segments, offset):
            target = resolve(mods, segments)
            if target is None or target == mod.name:
                return
            line = line_at[offset] + 1
            if (target, line) not in seen:
                seen.add((target, line))
                edges.append((mod.name, target, mod.path, line))

        for m in re.finditer(r"(?<![A-Za-z0-9_:])(crate|super|self)\s*::", code):
            here = own + inline(m.start())
            kind = m.group(1)
            if kind == "crate":
                base = []
            elif kind == "self":
                base = here
            else:
                base = here[:-1]
                j = m.end()
                # super::super::...
                while True:
                    m2 = re.compile(r"\s*super\s*::").match(code, j)
                    if not m2:
                        break
                    base, j = base[:-1], m2.end()
                for p in path_after(code, j):
                    add(base + p, m.start())
                continue
            for p in path_after(code, m.end()):
                add(base + p, m.start())
        # A bare `child::x` (or `use child::x`) in a parent module names its child module.
        children = {n.split("::")[-1] for n in mods if n and n.rsplit("::", 1)[0] == mod.name}
        if not mod.name:
            children = {n for n in mods if n and "::" not in n}
        for m in re.finditer(r"(?<![A-Za-z0-9_:])(" + IDENT + r")\s*::", code):
            if m.group(1) in children and not inline(m.start()):
                for p in path_after(code, m.end()):
                    add(own + [m.group(1)] + p, m.start())
    return edges


# ----------------------------------------------------------------------------- checking

class CrateMap:
    def __init__(self, name, table):
        self.name = name
        self.src = table["src"]
        # A folder layer lists its folder's module (`hooks`): its files are `hooks::..`.
        self.layers = [(layer["name"], list(layer.get("modules", [])) + ([layer["folder"]] if "folder" in layer else []))
                       for layer in table["layers"]]
        self.folders = {layer["folder"]: layer["name"] for layer in table["layers"] if "folder" in layer}
        self.allow = {(a["from"], a["to"]): a.get("why", "") for a in table.get("allow", [])}

    def layer_of(self, module):
        """(index, layer name) of the nearest listed module for `module`; the root is above
        every layer (-1); None when nothing lists it."""
        if module == "":
            return (-1, "crate root")
        segs = module.split("::")
        if segs[0] in self.folders:  # the folder decides, whatever a list says
            return next((i, layer) for i, (layer, _m) in enumerate(self.layers) if layer == self.folders[segs[0]])
        for k in range(len(segs), 0, -1):
            name = "::".join(segs[:k])
            for i, (layer, members) in enumerate(self.layers):
                if name in members:
                    return (i, layer)
        return None


def find_cycles(graph):
    """Elementary cycles of a small directed graph {node: {succ: [witness, ...]}}, each once."""
    cycles, nodes = [], sorted(graph)
    for start in nodes:
        stack = [(start, [start])]
        while stack:
            node, path = stack.pop()
            for succ in sorted(graph.get(node, {})):
                if succ == start:
                    cycles.append(path[:])
                elif succ not in path and succ > start:
                    stack.append((succ, path + [succ]))
    return cycles


def check_crate(root, cm, show_graph=False):
    """(errors, warnings): lines to print."""
    errors, warnings = [], []
    src = os.path.join(root, cm.src)
    mods = crate_modules(src)
    rel = lambda p: os.path.relpath(p, root)  # noqa: E731

    for name, mod in sorted(mods.items()):
        if cm.layer_of(name) is None:
            errors.append(f"{rel(mod.path)}:1: module {cm.name}::{name} is in no layer: add it to a "
                          f"layer of crate {cm.name} in the layer map (rule: every module has a layer)")
    for layer, members in cm.layers:
        for m in members:
            folder = m.split("::")[0]
            if folder in cm.folders and cm.folders[folder] != layer:
                errors.append(f"layer map: crate {cm.name} lists {m} in layer {layer}, but it lives in the folder of "
                              f"layer {cm.folders[folder]} (rule: a module's layer is its folder; move the file)")
    for folder in sorted(cm.folders):
        if not os.path.isdir(os.path.join(src, folder)):
            warnings.append(f"layer map: crate {cm.name}: layer folder {cm.src}/{folder} does not exist")
    listed = {m for _l, members in cm.layers for m in members}
    for m in sorted(listed - set(mods)):
        warnings.append(f"layer map: crate {cm.name} lists module {m}, which has no file under {cm.src}")

    edges = module_edges(mods)
    used_allow = set()
    layer_graph = {}
    for frm, to, path, line in sorted(edges, key=lambda e: (e[2], e[3])):
        if show_graph:
            print(f"{cm.name}: {frm or '(root)'} -> {to}  {rel(path)}:{line}")
        lf, lt = cm.layer_of(frm), cm.layer_of(to)
        if lf is None or lt is None or lf[0] <= lt[0]:
            continue
        key = (frm, to)
        if key in cm.allow:
            used_allow.add(key)
            continue
        errors.append(f"{rel(path)}:{line}: upward import {frm} -> {to} ({lf[1]} is below {lt[1]}) "
                      f"in crate {cm.name} (rule: a module imports only from its own layer and the "
                      f"layers below it; move the code down, or pass it in from above)")
        layer_graph.setdefault(lf[1], {}).setdefault(lt[1], []).append(f"{rel(path)}:{line}")
    # The downward edges close the cycles the upward ones open.
    for frm, to, path, line in edges:
        lf, lt = cm.layer_of(frm), cm.layer_of(to)
        if lf and lt and lf[0] < lt[0] and lf[0] >= 0:
            layer_graph.setdefault(lf[1], {}).setdefault(lt[1], []).append(f"{rel(path)}:{line}")
    for cyc in find_cycles(layer_graph):
        hops = []
        for a, b in zip(cyc, cyc[1:] + cyc[:1]):
            hops.append(f"{a} -> {b} ({layer_graph[a][b][0]})")
        errors.append(f"cycle between layers of crate {cm.name}: " + ", ".join(hops)
                      + " (rule: the layers form a stack; no import may lead back up)")
    for key in sorted(set(cm.allow) - used_allow):
        warnings.append(f"layer map: crate {cm.name}: allowlist entry {key[0]} -> {key[1]} is no "
                        f"longer needed (no such upward import): remove it")
    return errors, warnings


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--map", default="docs/layers.toml")
    ap.add_argument("--root", default=".")
    ap.add_argument("--graph", action="store_true", help="print every edge between modules")
    args = ap.parse_args(argv)
    with open(os.path.join(args.root, args.map), "rb") as f:
        layer_map = tomllib.load(f)
    errors, warnings = [], []
    crates = layer_map.get("crates", {})
    for name, table in crates.items():
        e, w = check_crate(args.root, CrateMap(name, table), args.graph)
        errors += e
        warnings += w
    for w in warnings:
        print("warning: " + w, file=sys.stderr)
    for e in errors:
        print(e, file=sys.stderr)
    if errors:
        print(f"layers: {len(errors)} error(s); the layer map is {args.map}", file=sys.stderr)
        return 1
    allowed = sum(len(CrateMap(n, t).allow) for n, t in crates.items())
    print(f"layers: {len(crates)} crates checked against {args.map}, no new upward import "
          f"({allowed} allowlisted)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
