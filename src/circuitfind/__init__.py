"""circuitfind: circuit discovery under many activation-patching settings.

Where to start: ``docs/architecture.md`` maps the data flow (model -> task batch -> setup ->
engines -> discovery -> Circuit -> graph files -> sweep -> compare -> report) and every module.
In code: :func:`circuitfind.models.catalogue.load_model`, :func:`circuitfind.patching.prepare`,
:class:`circuitfind.edge_patching.EdgePatcher` and :func:`circuitfind.methods.discover.discover`.
"""

__version__ = "0.3.0"
