"""ctypes bindings generated from the kernels' header (cpu/levante.h), the one list of them.

The header's prototypes (lines starting with ``LV_API``), its ``typedef struct`` blocks and its
``enum`` constants are read once; ``bind`` gives a loaded variant its functions' argument and
result types, ``STRUCTS`` the structures (``DecodeLinear``, ``DecodeBlock``) and ``CONSTANTS``
the enum values. A function added to the header is callable from Python with nothing else to
edit; a type the parser does not know is an error at import, not a wrong call.
"""
from __future__ import annotations

import ctypes
import re
from dataclasses import dataclass
from pathlib import Path

HEADER = Path(__file__).with_name("cpu") / "levante.h"

_SCALARS = {
    "void": None, "int": ctypes.c_int, "float": ctypes.c_float, "double": ctypes.c_double,
    "int64_t": ctypes.c_int64, "int32_t": ctypes.c_int32, "int16_t": ctypes.c_int16, "int8_t": ctypes.c_int8,
    "uint64_t": ctypes.c_uint64, "uint32_t": ctypes.c_uint32, "uint16_t": ctypes.c_uint16,
    "uint8_t": ctypes.c_uint8,
}
_COMMENTS = re.compile(r"/\*.*?\*/|//[^\n]*", re.S)
_PROTOTYPE = re.compile(r"LV_API\s+(?P<ret>[\w\s*]+?)\s*\b(?P<name>lv_\w+)\s*\((?P<args>[^)]*)\)\s*;")
_STRUCT = re.compile(r"typedef\s+struct\s*\{(?P<body>[^}]*)\}\s*(?P<name>\w+)\s*;")
_ENUM = re.compile(r"enum\s*\{(?P<body>[^}]*)\}\s*;")


@dataclass(frozen=True)
class Function:
    name: str
    restype: object
    argtypes: tuple


def _ctype(declared: str, structs: dict, result: bool = False):
    """The ctypes type of a C type as written (``const void *``, ``int64_t``, ``DecodeLinear``)."""
    words = declared.replace("*", " * ").split()
    pointer = "*" in words
    base = [w for w in words if w not in ("const", "*", "struct", "unsigned", "signed")]
    if len(base) != 1:
        raise ValueError(f"levante.h: cannot bind the type {declared!r}")
    name = base[0]
    if pointer:
        return ctypes.c_char_p if result and name == "char" else ctypes.c_void_p
    if name in _SCALARS:
        return _SCALARS[name]
    if name in structs:
        return structs[name]
    raise ValueError(f"levante.h: cannot bind the type {declared!r}")


def _split_declaration(declaration: str) -> tuple[str, str]:
    """``const float *scale`` -> (``const float *``, ``scale``)."""
    match = re.match(r"(?P<type>.*?)(?P<name>\w+)\s*$", declaration.strip(), re.S)
    if match is None or not match["type"].strip():
        raise ValueError(f"levante.h: cannot read the declaration {declaration!r}")
    return match["type"].strip(), match["name"]


def _struct(name: str, body: str, structs: dict) -> type[ctypes.Structure]:
    fields = []
    for statement in filter(None, (s.strip() for s in body.split(";"))):
        first, *more = statement.split(",")
        kind, field = _split_declaration(first)
        base = kind.replace("*", "").strip()  # `const void *a, *b`: later names share the base type
        fields.append((field, _ctype(kind, structs)))
        for extra in more:
            stars = extra.count("*")
            fields.append((extra.replace("*", "").strip(), _ctype(base + " *" * stars, structs)))
    return type(name, (ctypes.Structure,), {"_fields_": fields, "__doc__": f"levante.h's {name}."})


def parse(text: str):
    """(functions by name, structures by name, enum constants by name) of a header's text."""
    text = _COMMENTS.sub(" ", text)
    constants: dict[str, int] = {}
    for enum in _ENUM.finditer(text):
        for item in filter(None, (i.strip() for i in enum["body"].split(","))):
            key, _, value = item.partition("=")
            constants[key.strip()] = int(value, 0) if value.strip() else max(constants.values(), default=-1) + 1
    structs: dict[str, type[ctypes.Structure]] = {}
    for struct in _STRUCT.finditer(text):
        structs[struct["name"]] = _struct(struct["name"], struct["body"], structs)
    functions = {}
    for proto in _PROTOTYPE.finditer(text):
        args = [a.strip() for a in proto["args"].split(",") if a.strip() and a.strip() != "void"]
        argtypes = tuple(_ctype(_split_declaration(a)[0], structs) for a in args)
        functions[proto["name"]] = Function(proto["name"], _ctype(proto["ret"], structs, result=True), argtypes)
    return functions, structs, constants


FUNCTIONS, STRUCTS, CONSTANTS = parse(HEADER.read_text())


def bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    """Set every header function's argtypes and restype on a loaded variant (AttributeError: one is missing)."""
    for function in FUNCTIONS.values():
        fn = getattr(lib, function.name)
        fn.argtypes = list(function.argtypes)
        fn.restype = function.restype
    return lib
