"""circuitfind: circuit discovery under many activation-patching settings."""

__version__ = "0.2.0"
