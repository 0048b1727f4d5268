"""C++ identifiers for generated code: every name taken from a `.moe` file passes through here."""

from __future__ import annotations

import re

CPP_KEYWORDS = frozenset(["alignas", "alignof", "and", "and_eq", "asm", "auto", "bitand", "bitor", "bool", "break", "case", "catch", "char", "char8_t", "char16_t", "char32_t", "class", "compl", "concept", "const", "consteval", "constexpr", "constinit", "const_cast", "continue", "co_await", "co_return", "co_yield", "decltype", "default", "delete", "do", "double", "dynamic_cast", "else", "enum", "explicit", "export", "extern", "false", "float", "for", "friend", "goto", "if", "inline", "int", "long", "mutable", "namespace", "new", "noexcept", "not", "not_eq", "nullptr", "operator", "or", "or_eq", "private", "protected", "public", "register", "reinterpret_cast", "requires", "return", "short", "signed", "sizeof", "static", "static_assert", "static_cast", "struct", "switch", "template", "this", "thread_local", "throw", "true", "try", "typedef", "typeid", "typename", "union", "unsigned", "using", "virtual", "void", "volatile", "wchar_t", "while", "xor", "xor_eq", "final", "override", "import", "module"])

# Names the generated project itself defines or includes (types, kernels, files, libc symbols).
RESERVED = frozenset({
    "main", "moec", "std", "hls", "defines", "parameters", "bridge", "weights", "act_t", "accum_t", "weight_t",
    "input_t", "result_t", "route_t", "tern_t", "ap_fixed", "ap_int", "ap_uint", "ap_ufixed", "exp", "sqrt",
    "tanh", "erf", "printf", "malloc", "free", "abs", "max", "min", "NULL", "assert", "errno", "stdin", "stdout",
})

_INVALID = re.compile(r"[^A-Za-z0-9_]")


def c_identifier(text: str, prefix: str = "m_") -> str:
    """`text` as a C++ identifier matching [A-Za-z_][A-Za-z0-9_]*, never a keyword, a reserved
    name or an implementation-reserved one (`__x`, `_X`)."""
    name = _INVALID.sub("_", text) or "unnamed"
    if name[0].isdigit() or name in CPP_KEYWORDS or name in RESERVED or name.startswith(("_", "moec_")) or "__" in name:
        name = prefix + name.strip("_").replace("__", "_")
        name = re.sub(r"_+", "_", name)
    return name


class Namer:
    """Hands out unique identifiers (a numeric suffix resolves clashes)."""

    def __init__(self, taken: set[str] | None = None):
        self.taken = set(taken or ())

    def __call__(self, text: str, prefix: str = "m_") -> str:
        base = c_identifier(text, prefix)
        name, i = base, 1
        while name in self.taken:
            i += 1
            name = f"{base}_{i}"
        self.taken.add(name)
        return name
