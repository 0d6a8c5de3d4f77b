"""Griffe extension for the API reference: render Keras-style docstrings.

Keras' docstring convention has a ``Call arguments:`` section (the arguments of ``call``),
which the Google-style parser does not know: it would show it as an admonition with its
items run together. This extension parses its items like ``Args:`` and shows them as a
parameter table titled "Call arguments". It also turns Sphinx roles such as
``:class:`tf_actnorm.ActNormBijector``` into cross-references to the API pages, and leaves
private arguments (``_state``) out of the signatures. Names that ``tf_actnorm/__init__.py``
imports lazily (its module ``__getattr__`` and ``_LAZY`` table, so that importing the
package imports no framework) are invisible to static analysis; the extension adds them to the
package as aliases of their defining objects, as a plain re-export would be.

Loaded by mkdocs.yml (``extensions:`` of the mkdocstrings Python handler); it only affects
the built site, never the package.
"""

import ast
import re

import griffe

_ROLE = re.compile(r":(?:class|func|meth|attr|mod):`~?([\w.]+)`")
_SECTIONS = {"call arguments": "Call arguments:"}


class KerasDocstrings(griffe.Extension):
    def on_package(self, *, pkg, **kwargs):
        # `_LAZY = {"Name": ("module", "what to install"), ...}` in __init__.py.
        table = pkg.members.get("_LAZY")
        if table is None or getattr(table, "value", None) is None:
            return
        for name, (module, _) in ast.literal_eval(str(table.value)).items():
            if name not in pkg.members:
                pkg.set_member(name, griffe.Alias(name, f"{module}.{name}", parent=pkg))

    def on_object(self, *, obj, loader, **kwargs):
        init = obj.members.get("__init__") if obj.is_class else None
        for function in filter(None, [init, obj if obj.is_function else None]):
            for name in [p.name for p in function.parameters if p.name.startswith("_")]:
                del function.parameters[name]   # private arguments stay out of the signature
        docstring = obj.docstring
        if docstring is None:
            return
        docstring.value = _ROLE.sub(r"[`\1`][\1]", docstring.value)
        sections = docstring.parse()
        for index, section in enumerate(sections):
            title = (getattr(section, "title", None) or "").strip().rstrip(":")
            if section.kind is griffe.DocstringSectionKind.admonition and title.lower() in _SECTIONS:
                items = section.value.contents
                # A summary line first: griffe dedents all lines after the first one.
                as_args = griffe.Docstring(
                    "Call arguments.\n\nArgs:\n" + "\n".join("    " + l for l in items.splitlines()),
                    parent=obj, parser=docstring.parser,
                    # they are `call`'s arguments, not the constructor's
                    parser_options={**docstring.parser_options, "warn_unknown_params": False})
                (parameters,) = [s for s in as_args.parse()
                                 if s.kind is griffe.DocstringSectionKind.parameters]
                parameters.title = _SECTIONS[title.lower()]
                call = obj.members.get("call") if obj.is_class else None
                for parameter in parameters.value:  # defaults from `call`'s signature
                    if call is not None and parameter.name in call.parameters:
                        parameter.value = call.parameters[parameter.name].default
                sections[index] = parameters
        docstring.__dict__["parsed"] = sections  # what the templates read (a cached property)
