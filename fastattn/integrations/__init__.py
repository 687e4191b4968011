"""Integrations with other libraries; each is optional and imports its library only when used.

- ``fastattn.integrations.huggingface``: fastattn as a transformers attention implementation.
"""
