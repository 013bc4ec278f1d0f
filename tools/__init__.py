"""Tools that measure and describe a model folder (bench, eval, soak, inspect).

They stand beside the CLI and import the runtime; an app that embeds the runtime never
imports them.
"""
