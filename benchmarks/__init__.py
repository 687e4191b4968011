"""fastattn's benchmark suite: one script per kernel family plus modules and end-to-end training.

``python -m benchmarks.run`` measures what runs on the device present and writes
``benchmarks/results/<device>/`` (JSON, Markdown, PNG); ``python -m benchmarks.report`` turns those
files into the README's results section and compares runs.
"""

FAMILIES = ("attention", "softmax", "ffn", "norm", "modules", "training")
