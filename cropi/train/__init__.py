"""The bundled GRPO trainer (docs/design.md).

Math lives in small pure modules: ``config`` (every option, once), ``advantages``,
``losses`` and ``samplers``. Import them directly; this package imports nothing heavy.
"""
