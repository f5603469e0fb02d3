"""Makes a clone of this repository importable as ``tokensieve`` from the folder above it.

Python looks in the current directory before the installed packages: from the parent folder of a clone named
``tokensieve``, ``import tokensieve`` finds the clone itself. Without this file the clone would be an empty
namespace package and ``tokensieve.load`` an AttributeError. The installed package maps ``tokensieve`` to api/
and ``tokensieve.X`` to the folder X (setup.py); this file gives the clone the same layout: the package's
search path is api/ then the clone's root, and its body is api/__init__.py, run here. An installed package
never contains this file (setup.py maps the package to api/). Imported under any other name (pytest imports
a package's ``__init__.py`` by its folder's name when it collects the folder) it does nothing.
"""
if __name__ == "tokensieve":
    import os as _os

    _root = _os.path.dirname(_os.path.abspath(__file__))
    __path__ = [_os.path.join(_root, "api"), _root]
    _facade = _os.path.join(_root, "api", "__init__.py")
    with open(_facade, encoding="utf-8") as _f:
        exec(compile(_f.read(), _facade, "exec"))  # noqa: S102 - the facade's own source, as the installed package runs it
