"""C++ identifiers for generated code: every name taken from a `.moe` file passes through here.

Name spaces of the generated project, disjoint by construction:
- the project's own identifiers: macros and header guards `MOEC_*`, globals and functions `moec_*`
  (queues `moec_q<i>`, kernel configurations `moec_linear_*`, the ctypes bridge), the kernels in
  `namespace moec`, and the fixed hls4ml-style types (act_t, ...) and file stems of RESERVED;
- weights: `w_<parameter path>` (the path's names come from the .moe file), unique ignoring case;
- the model's top function `<model>` (with `<model>_load_weights`, `<model>_csim`, the files
  `firmware/<model>.*` and the guard `MOEC_TOP_<MODEL>_H_`): `top_identifier` keeps it out of the
  other spaces (no `moec`/`w_`/`ap_` prefix in any case, no keyword, reserved name or macro name).
The project is compiled with `-iquote firmware`, so a model named like a system header (`math`,
`stdio`) does not shadow it."""

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


def top_identifier(text: str) -> str:
    """The model name as the top function's identifier, outside the project's own name spaces: a
    name starting with `moec`, `w_` or `ap_` (any case), `w` itself, a reserved name in any case
    (file stems on case-insensitive file systems), a macro-style name (no lowercase letter: the
    headers' macros) or a lowercase C library macro gets the prefix `m_`."""
    name = c_identifier(text)
    low = name.lower()
    if (low.startswith(("moec", "w_", "ap_")) or low == "w" or low in _RESERVED_LOWER or name in C_LOWERCASE_MACROS
            or name == name.upper()):
        name = "m_" + name
    return name


_RESERVED_LOWER = frozenset(n.lower() for n in RESERVED)

# The C standard library's lowercase macros (a closed set fixed by the standard); the headers'
# other macros (EOF, NULL, AP_SAT, ...) have no lowercase letter, and such names are prefixed too.
C_LOWERCASE_MACROS = frozenset({
    "assert", "errno", "stderr", "stdin", "stdout", "offsetof", "setjmp", "va_arg", "va_copy", "va_end",
    "va_start", "math_errhandling", "fpclassify", "isfinite", "isinf", "isnan", "isnormal", "signbit",
    "isgreater", "isgreaterequal", "isless", "islessequal", "islessgreater", "isunordered",
})


class Namer:
    """Hands out unique identifiers (a numeric suffix resolves clashes), unique ignoring case: they
    also name files and upper-cased header guards."""

    def __init__(self, taken: set[str] | None = None):
        self.taken = {t.lower() for t in taken or ()}

    def __call__(self, text: str, prefix: str = "m_") -> str:
        base = c_identifier(text, prefix)
        name, i = base, 1
        while name.lower() in self.taken:
            i += 1
            name = f"{base}_{i}"
        self.taken.add(name.lower())
        return name
