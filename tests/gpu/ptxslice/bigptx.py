"""Makes one large PTX module from a small one, for timing the slicer per MB (issue 19: at most 1 s
per MB of PTX): the module's functions, shared variables and labels are copied with a suffix until
the text reaches the size asked for.

    python3 bigptx.py IN.ptx OUT.ptx [MEGABYTES=1]
"""
import re
import sys


def main() -> int:
    src, dst = sys.argv[1], sys.argv[2]
    target = float(sys.argv[3]) if len(sys.argv) > 3 else 1.0
    text = open(src).read()
    head_end = text.index(".address_size")
    head_end = text.index("\n", head_end) + 1
    head, body = text[:head_end], text[head_end:]
    # Names the copies must not share: entries, device functions and module-scope variables.
    names = set(re.findall(r"\.entry\s+([\w$]+)", body))
    names |= set(re.findall(r"\.func\s*(?:\([^)]*\))?\s*([\w$]+)", body))
    names |= set(re.findall(r"^\s*(?:\.extern\s+)?\.(?:shared|global|const)\s[^;]*?([\w$]+)\s*\[", body, re.M))
    pattern = re.compile(r"(?<![\w$%])(" + "|".join(sorted(map(re.escape, names), key=len, reverse=True)) + r")(?![\w$])")
    parts, size, i = [head], len(head), 0
    while size < target * 1e6:
        copy = pattern.sub(lambda m: f"{m.group(1)}_c{i}", body)
        parts.append(copy)
        size += len(copy)
        i += 1
    open(dst, "w").write("".join(parts))
    print(f"bigptx: {i} copies, {size} bytes, {len(names)} names renamed per copy")
    return 0


if __name__ == "__main__":
    sys.exit(main())
